"""The `flowjax` command line (also `python -m flowjax`).

Each subcommand is a `Command`: a one-line help, a function that adds its options to
an `argparse` parser, and a function that runs it and returns the exit status. The
built-in ones are `demo`, `refine` and `save-example-model`. Another module adds
commands without editing this file: list it in `EXTENSION_MODULES` (a missing module
is skipped) and give it a `COMMANDS: dict[str, Command]`; `flowjax experiment` is
meant to arrive that way, from `flowjax/_experiment_cli.py`.

A user's mistake (a bad option, a missing or broken model file, inputs of the wrong
shape) ends with one line on stderr and exit status 2 (`EXIT_USAGE`), never a
traceback: `main` turns the `ValueError`, `TypeError` and `OSError` that the library
raises for such mistakes into that line. Anything else is a bug and keeps its
traceback (exit status 1). `EXIT_STATUSES` says so in `flowjax --help`.
"""

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn


PROG = "flowjax"
EXTENSION_MODULES = ("flowjax._experiment_cli",)
EXIT_USAGE = 2
EXIT_STATUSES = (
    "exit status: 0 done; 2 a mistake in the command: a bad option or option value, "
    "a missing, unreadable or broken file, inputs of the wrong shape (one line on "
    "stderr says which); 1 an unexpected error (a bug: a traceback); 130 "
    "interrupted (Ctrl-C)."
)
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1, as numpy and jax.random.key take


class Command(NamedTuple):
    """A subcommand: `help` (one line), `add_arguments(parser)`, `run(args) -> int`."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """A bad combination of options, found after parsing."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` that reports a usage error in one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        )


# Option types


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def seed_value(text: str) -> int:
    """An argparse type: a random seed, an integer in `0 .. 2**32 - 1`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {text!r}"
        ) from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"a seed must be between 0 and {SEED_LIMIT - 1} (2**32 - 1), got {value}"
        )
    return value


# `flowjax demo`


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from ._demo import ACTIVATIONS, DemoConfig

    parser.add_argument(
        "--out",
        type=Path,
        default=DemoConfig.out,
        help="folder for the table, plots and model file (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="random seed (default: 0)"
    )
    parser.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default="relu",
        help="activation of the plain nets (default: relu)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast run (seconds) that writes every file: for tests",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoConfig, run_demo

    check_out_folder(args.out, "--out")
    run_demo(DemoConfig(args.out, args.seed, args.activation, args.quick))
    return 0


# `flowjax refine`


def _refine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        type=Path,
        help="a plain MLP in flowjax's model file format (docs/model-file.md)",
    )
    parser.add_argument(
        "--num-steps",
        type=positive_int,
        required=True,
        metavar="N",
        help="Euler steps per stage of each layer",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="where to write the refined ResNet",
    )
    parser.add_argument(
        "--linear",
        choices=("whole", "flow"),
        default="whole",
        help="keep each W x + b as one map ('whole', default) or "
        "discretize its rotations, stretch and translation ('flow')",
    )
    parser.add_argument(
        "--smooth-blocks",
        choices=("exact", "linearized", "newton", "augmented"),
        default="exact",
        help="for smooth activations (tanh, sigmoid, ...): how the activation blocks "
        "invert the homotopy (refine's activation=; default: exact). ReLU-family "
        "blocks are always exact",
    )
    parser.add_argument(
        "--inputs",
        type=Path,
        metavar="FILE.npy",
        help="inputs for the error certificate, shape (N, in_size); "
        "default: --num-inputs standard normal inputs",
    )
    parser.add_argument(
        "--num-inputs",
        type=positive_int,
        default=256,
        metavar="M",
        help="how many random inputs without --inputs (default: 256)",
    )
    parser.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="seed of the random inputs (default: 0)",
    )


def _run_refine(args: argparse.Namespace) -> int:
    from ._certificate import certify, format_certificate

    _check_out_path(args.out, "--out")
    mlp = _load_plain_mlp(args.model_file)
    inputs, source = _certificate_inputs(args, mlp)
    options = {"linear": args.linear, "activation": args.smooth_blocks}
    refined, certificate = certify(mlp, args.num_steps, inputs, **options)
    _save_refined(args.out, refined, mlp, args.num_steps, options)
    print(format_certificate(certificate, args.model_file, source))
    print(f"wrote {args.out} (read it with flowjax.load_model)")
    return 0


def _load_plain_mlp(path: Path) -> Any:
    import jax

    from ._serialise import load_model, read_header

    _check_in_path(path, "model file")
    header = read_header(path)
    if header["kind"] != "mlp":
        raise UsageError(
            f"{path} holds a model of kind {header['kind']!r}; `flowjax refine` "
            "takes a plain MLP (kind 'mlp')."
        )
    if header["architecture"]["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    return load_model(path)[0]


def _certificate_inputs(args: argparse.Namespace, mlp: Any) -> tuple[Any, str]:
    import jax
    import numpy as np

    dtype = jax.tree.leaves(mlp.layers)[0].dtype
    shape = () if mlp.in_size == "scalar" else (mlp.in_size,)
    if args.inputs is None:
        rng = np.random.default_rng(args.seed)
        X = rng.standard_normal((args.num_inputs, *shape)).astype(dtype)
        return X, f"{args.num_inputs} standard normal inputs (seed {args.seed})"
    wanted = "(N" + "".join(f", {d}" for d in shape) + ("," if not shape else "") + ")"
    _check_in_path(args.inputs, "--inputs file")
    X = _load_npy(args.inputs, wanted)
    if isinstance(X, np.ndarray) and X.shape[1:] == shape and X.shape[0] == 0:
        raise UsageError(
            f"{args.inputs} holds no inputs (an array of shape {X.shape}); --inputs "
            f"needs an array of shape {wanted} with N >= 1."
        )
    if not isinstance(X, np.ndarray) or X.shape[1:] != shape:
        found = (
            f"an array of shape {X.shape}"
            if isinstance(X, np.ndarray)
            else "an .npz archive"
        )
        raise UsageError(
            f"{args.inputs} holds {found}; the model takes inputs of shape {shape}, "
            f"so --inputs needs an array of shape {wanted}."
        )
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise UsageError(
            f"{args.inputs} holds values of dtype {X.dtype}; --inputs needs real "
            f"numbers."
        )
    if not np.all(np.isfinite(X)):
        from ._training import _first_nonfinite

        raise UsageError(
            f"{args.inputs} holds {_first_nonfinite(X)}; --inputs needs finite numbers."
        )
    return X.astype(dtype), f"{len(X)} inputs from {args.inputs}"


def _check_in_path(path: Path, what: str) -> None:
    """Refuse an input file that is missing or a folder, naming it as `what`."""
    if path.is_dir():
        raise UsageError(f"{what} '{path}' is a folder, not a file.")
    if not path.exists():
        raise UsageError(f"{what} '{path}' does not exist.")


def _load_npy(path: Path, wanted: str) -> Any:
    """`numpy.load(path)`; a file that is no NumPy array file is a `UsageError`."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError):  # empty, pickled, or not NumPy at all
        with open(path, "rb") as f:
            head = f.read(6)
    if not head:
        reason = "it is empty"
    elif head == b"\x93NUMPY":
        reason = "it holds Python objects, not numbers"
    else:
        reason = "it does not start with the .npy header"
    raise UsageError(
        f"--inputs {path} is not a NumPy .npy array file ({reason}); --inputs "
        f"needs an array of shape {wanted} written with numpy.save."
    )


def _check_out_path(path: Path, option: str) -> None:
    """Refuse an output path whose folder is missing, before any work is done."""
    folder = path.parent
    if path.is_dir():
        raise UsageError(
            f"{option} {path} is a folder; give a file name, e.g. "
            f"{path / 'refined.fjx'}."
        )
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(
            f"{option} {path}: the folder {folder} {what}; create it first "
            f"(mkdir -p {folder}) or write somewhere else."
        )


def check_out_folder(path: Path, option: str) -> None:
    """Refuse an output folder that is a file or lies inside one, before any work.

    A folder that does not exist yet is fine: the command creates it.
    """
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return
            inside = "" if folder == path else f" (it lies inside the file {folder})"
            raise UsageError(
                f"{option} {path} is not a folder{inside}; {option} names a folder "
                f"for the output files (created if missing): give a folder path."
            )


def _save_refined(path: Path, refined: Any, mlp: Any, num_steps: int, options) -> None:
    from ._serialise import save_refined

    save_refined(path, refined, mlp, {"num_steps": num_steps, **options})


# `flowjax save-example-model`


def _example_arguments(parser: argparse.ArgumentParser) -> None:
    from ._demo import ACTIVATIONS

    parser.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="where to write the model (e.g. digits.fjx)",
    )
    parser.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default="relu",
        help="activation of the MLP (default: relu)",
    )
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="random seed (default: 0)"
    )
    parser.add_argument(
        "--inputs",
        type=Path,
        metavar="FILE.npy",
        help="also write the standardized test digits here, "
        "for `flowjax refine --inputs`",
    )


def _run_example(args: argparse.Namespace) -> int:
    import jax.random as jr
    import numpy as np

    from ._demo import DEFAULT, load_digits_split, train_mlp
    from ._serialise import save_mlp

    _check_out_path(args.file, "FILE")
    if args.inputs is not None:
        _check_out_path(args.inputs, "--inputs")
    split = load_digits_split(args.seed)
    mlp = train_mlp(
        split.X_train,
        split.y_train,
        width=DEFAULT.width,
        depth=DEFAULT.depth,
        activation=args.activation,
        epochs=DEFAULT.epochs,
        key=jr.key(args.seed),
        progress="training",
    )
    save_mlp(args.file, mlp)
    print(
        f"wrote {args.file}: a 64-{DEFAULT.width}-{DEFAULT.width}-10 "
        f"{args.activation} MLP trained on scikit-learn's digits"
    )
    if args.inputs is not None:
        np.save(args.inputs, split.X_test)
        print(f"wrote {args.inputs}: {len(split.X_test)} standardized test digits")
    return 0


# The registry and the entry point


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "train a plain net on real digits, solve its flow model, refine it into "
        "ResNets; writes a table and plots",
        _demo_arguments,
        _run_demo,
    ),
    "refine": Command(
        "refine a saved MLP into a ResNet and certify its error",
        _refine_arguments,
        _run_refine,
    ),
    "save-example-model": Command(
        "train the demo's digits MLP and save it as a model file for `refine`",
        _example_arguments,
        _run_example,
    ),
}


def all_commands() -> dict[str, Command]:
    """The built-in commands and those of every `EXTENSION_MODULES` entry present."""
    commands = dict(COMMANDS)
    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # not written yet
            raise
        commands.update(module.COMMANDS)
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The flow model of neural networks: plain nets as transport "
        "flows, ResNets as their Euler refinements.",
        epilog=f"Run `{PROG} COMMAND --help` for the options of a command. "
        + EXIT_STATUSES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in all_commands().items():
        sub_parser = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=EXIT_STATUSES,
            prog=f"{PROG} {name}",
        )
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run, _parser=sub_parser)
    return parser


def _looks_like_option(token: str) -> bool:
    """Whether argparse reads `token` as an option (not a value like `-1.5`)."""
    if not token.startswith("-") or token in ("-", "--"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _unknown_options(
    parser: argparse.ArgumentParser, tokens: Sequence[str]
) -> list[str]:
    """The tokens that look like options `parser` does not know (nor abbreviates).

    Stops at `--`, after which every token is a value.
    """
    known = [option for action in parser._actions for option in action.option_strings]
    unknown = []
    for token in tokens:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if _looks_like_option(token) and not any(k.startswith(name) for k in known):
            unknown.append(name)
    return unknown


def _split_command(tokens: Sequence[str], commands: Sequence[str]) -> int:
    """The index of the command name in `tokens`, or `len(tokens)` if none."""
    for index, token in enumerate(tokens):
        if token in commands or not token.startswith("-"):
            return index
    return len(tokens)


def _refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Report an unknown option by name before argparse asks for missing ones."""
    subparsers = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    choices: dict[str, argparse.ArgumentParser] = subparsers.choices
    at = _split_command(argv, list(choices))
    unknown = _unknown_options(parser, argv[:at])
    if unknown:
        parser.error(
            f"unrecognized option {', '.join(unknown)}; options come after a "
            f"command, one of: {', '.join(choices)}"
        )
    if at < len(argv) and argv[at] in choices:
        sub_parser = choices[argv[at]]
        unknown = _unknown_options(sub_parser, argv[at + 1 :])
        if unknown:
            valid = sorted(
                {o for a in sub_parser._actions for o in a.option_strings} - {"-h"}
            )
            sub_parser.error(
                f"unrecognized option {', '.join(unknown)}; valid options: "
                f"{', '.join(valid)}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _refuse_unknown_options(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, which names itself and its --help
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args._run(args)
    except (ValueError, TypeError, OSError) as err:
        _error_line(args.command, err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error_line(args.command, "interrupted")
        return 130


def _error_line(command: str, err: BaseException | str) -> None:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
