"""The registry of experiments and their command line.

`EXPERIMENTS` maps each name to `(one-line description, module name)`. Importing
this module is cheap (no JAX); an experiment's module is imported only when it runs.

Command line, the same for all three entry points:

    python -m experiments.NAME [--scale tiny|small|large] [--seed S] [--out DIR]
                               [--distributed] [--dry-run]
    python -m experiments NAME [...]          python -m experiments --list
    flowjax experiment NAME [...]             flowjax experiment --list
"""

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


EXPERIMENTS: dict[str, tuple[str, str]] = {
    "two_layer_blocks": (
        "one-layer ReLU blocks push one way; tanh and two-layer blocks move both "
        "ways (equal parameters)",
        "experiments.two_layer_blocks",
    ),
    "deeper_is_better": (
        "fixed final time T, 1 to 64 Euler blocks on nested spirals: error "
        "against depth",
        "experiments.deeper_is_better",
    ),
    "refinement": (
        "refine trained plain nets of increasing depth into ResNets: accuracy "
        "kept and error certificate",
        "experiments.refinement",
    ),
    "trainability": (
        "plain nets against ResNets of equal depth (4 to 64), same optimizer and "
        "budget",
        "experiments.trainability",
    ),
    "dissipation": (
        "noise in the transport (an SDE) against dropout and neither, on a small "
        "training set, several seeds",
        "experiments.dissipation",
    ),
    "dimension_matching": (
        "concentric annuli with state dimension n = 2, 3, 4: accuracy and "
        "function evaluations",
        "experiments.dimension_matching",
    ),
    "slow_parameters": (
        "adjacent-block parameter differences: refined, smooth-trained and "
        "plain-trained ResNets, plain nets",
        "experiments.slow_parameters",
    ),
}
SCALE_CHOICES = ("tiny", "small", "large")


class UsageError(ValueError):
    """An unknown experiment name or a missing one."""


DEFAULT_SCALE = "small"


def list_lines() -> list[str]:
    """One line per experiment: its name and description."""
    width = max(map(len, EXPERIMENTS))
    return [f"{name.ljust(width)}  {text}" for name, (text, _) in EXPERIMENTS.items()]


def load(name: str) -> ModuleType:
    """The module of experiment `name`; `ValueError` naming the known ones."""
    if name not in EXPERIMENTS:
        raise UsageError(
            f"no experiment named {name!r}; the experiments are "
            f"{', '.join(EXPERIMENTS)} (list them with --list)."
        )
    return importlib.import_module(EXPERIMENTS[name][1])


def add_arguments(parser: argparse.ArgumentParser, *, with_name: bool = True) -> None:
    """The options of an experiment run (and, `with_name`, the NAME and --list)."""
    if with_name:
        parser.add_argument(
            "name",
            nargs="?",
            metavar="NAME",
            help="the experiment to run (see --list)",
        )
        parser.add_argument(
            "--list", action="store_true", help="list the experiments, one a line"
        )
    parser.add_argument(
        "--scale",
        choices=SCALE_CHOICES,
        default=DEFAULT_SCALE,
        help="tiny (seconds, for tests), small (a 2-core CPU, minutes) or "
        "large (an accelerator); default: %(default)s",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed, 0 to 2**32 - 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for results.json and figure.png (default: "
        "experiments/results/SCALE/NAME)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() before anything else touches JAX "
        "(multi-host runs; every process computes, process 0 writes the files)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the configuration's models and data shapes, lower one training "
        "step and trace one evaluation of each (no compilation, no training, no "
        "files); print shapes, parameter counts and the estimated memory per step",
    )


def _seed(text: str) -> int:
    """An argparse type: a seed in `0 .. 2**32 - 1` (`flowjax._cli.seed_value`,
    imported only when a seed is given, so that `--list` stays free of JAX)."""
    from flowjax._cli import seed_value

    return seed_value(text)


def check_out(out: Path | None) -> None:
    """Refuse an `--out` that is a file or lies inside one, before any work
    (`flowjax._cli.check_out_folder`); `None`, the default folder, passes."""
    if out is None:
        return
    from flowjax._cli import check_out_folder

    try:
        check_out_folder(Path(out), "--out")
    except ValueError as err:
        raise UsageError(str(err)) from None


def initialize_distributed() -> None:
    """Start JAX's multi-process runtime (`jax.distributed.initialize`, through
    `flowjax._sharding.maybe_initialize_distributed`); call it before JAX is used."""
    from flowjax._sharding import maybe_initialize_distributed

    maybe_initialize_distributed(True)


def run_experiment(
    name: str,
    *,
    scale: str = DEFAULT_SCALE,
    seed: int = 0,
    out: Path | None = None,
    distributed: bool = False,
    verbose: bool = True,
) -> dict:
    """Run experiment `name`, write its files and return its record (a dict)."""
    if name not in EXPERIMENTS:
        load(name)  # raises the UsageError naming the experiments
    if distributed:
        initialize_distributed()  # before the experiment's module touches JAX
    module = load(name)
    from ._common import RESULTS_DIR, execute, report

    record = execute(module, scale, seed, out)
    if verbose:
        where = RESULTS_DIR / scale / name if out is None else Path(out)
        print(report(record, where))
    return record


def dry_run_experiment(
    name: str, *, scale: str = DEFAULT_SCALE, verbose: bool = True
) -> dict:
    """The dry run of experiment `name` at `scale` (see `experiments._dry_run`):
    its record (a dict), printed as a table when `verbose`."""
    module = load(name)
    from ._dry_run import dry_run, report

    record = dry_run(module, scale)
    if verbose:
        print(report(record))
    return record


def run_from_args(args: argparse.Namespace) -> int:
    """Run what parsed arguments ask for (`--list` or one experiment); exit status."""
    if args.list:
        print("\n".join(list_lines()))
        return 0
    if args.name is None:
        raise UsageError(
            "name an experiment to run, or pass --list to see them: "
            + ", ".join(EXPERIMENTS)
        )
    if getattr(args, "dry_run", False):
        if args.distributed:
            initialize_distributed()
        dry_run_experiment(args.name, scale=args.scale)
        return 0
    if args.name not in EXPERIMENTS:
        load(args.name)  # raises the UsageError naming the experiments
    check_out(args.out)
    run_experiment(
        args.name,
        scale=args.scale,
        seed=args.seed,
        out=args.out,
        distributed=args.distributed,
    )
    return 0


def main(argv: Sequence[str] | None = None, *, name: str | None = None) -> int:
    """`python -m experiments [NAME] ...`, or with `name` fixed, `python -m
    experiments.NAME ...`. Returns the exit status."""
    prog = "python -m experiments" + ("" if name is None else f".{name}")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Experiments that check the claims of the flow model "
        "(docs/theory.md sec. 5).",
    )
    add_arguments(parser, with_name=name is None)
    args = parser.parse_args(argv)
    if name is not None:
        args.name, args.list = name, False
    try:
        return run_from_args(args)
    except UsageError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
