"""Experiment 2: deeper is better, because a complicated transport needs small steps.

Claim (docs/theory.md sec. 5 item 2): a ResNet is Euler's method on a flow (eq.
10-17); a transport that must deform the data strongly is approximated well only by
many small steps, so at a fixed final time `T` the error falls with the number of
blocks `L` (step `dt = T / L`) until the steps are small enough, then levels off.

Task: two interleaved spirals (`common.spirals`), embedded in `n = 3` dimensions, a
`flowjax.FlowNet` with a trained linear readout, trained by `flowjax.fit` with the
same optimizer and budget at every depth. Two variants:

- `per-block`: `L` blocks, each with its own parameters (the usual ResNet; the
  parameter count grows with `L`);
- `shared field`: one field with a fixed number of parameter sets, linear in time,
  integrated with `L` Euler steps (the parameter count is the same at every `L`, so
  only the step size changes).

The level-off step is the largest `dt` whose test error is within `tolerance` of the
best error of its variant.
"""

import dataclasses
import functools
import sys

import jax.random as jr
import numpy as np

from flowjax._classifier import FlowNet

from . import _common as common
from ._dry_run import DataShape, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "deeper_is_better"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "at a fixed final time T a transport that deforms the data strongly needs many "
    "small Euler steps: the error falls with depth and levels off once dt is small "
    "(theory sec. 5 item 2)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int
    n_test: int
    turns: float
    n: int
    hidden: int
    T: float
    depths: tuple[int, ...]
    variants: tuple[str, ...]
    field_params: int
    steps: int
    batch_size: int
    learning_rate: float
    tolerance: float = 0.02


CONFIGS = {
    "tiny": Config(128, 256, 1.5, 3, 8, 4.0, (1, 2), ("per-block",), 4, 60, 64, 1e-2),
    "small": Config(
        1000,
        2000,
        2.0,
        3,
        8,
        4.0,
        (1, 2, 4, 8, 16, 32, 64),
        ("per-block", "shared field"),
        8,
        1500,
        128,
        1e-2,
    ),
    "large": Config(
        8000,
        20000,
        3.0,
        3,
        16,
        4.0,
        (1, 2, 4, 8, 16, 32, 64, 128, 256),
        ("per-block", "shared field"),
        16,
        8000,
        256,
        5e-3,
    ),
}
COLUMNS = (
    "variant",
    "blocks",
    "dt",
    "parameters",
    "train_loss",
    "test_error",
    "seconds",
)


def build(variant: str, L: int, config: Config, key) -> FlowNet:
    """A FlowNet with `L` Euler steps of size `T / L` (see the module docstring)."""
    shared = variant != "per-block"
    return FlowNet.init(
        2,
        2,
        n=config.n,
        hidden=config.hidden,
        num_blocks=config.field_params if shared else L,
        key=key,
        T=config.T,
        interpolation="linear" if shared else "constant",
        num_steps=L if shared else None,
        dtype=common.DTYPE,
    )


def level_off(rows: list[dict], tolerance: float) -> dict:
    """The largest step `dt` (fewest blocks) whose test error is within `tolerance`
    of the best test error among `rows` (one variant)."""
    best = min(r["test_error"] for r in rows)
    good = [r for r in rows if r["test_error"] <= best + tolerance]
    first = min(good, key=lambda r: r["blocks"])
    return {"blocks": first["blocks"], "dt": first["dt"], "best_test_error": best}


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): every variant at every depth."""
    trainings = [
        Training(
            f"{variant}, {L} blocks",
            functools.partial(build, variant, L, config, jr.key(0)),
            dict(
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
            ),
        )
        for variant in config.variants
        for L in config.depths
    ]
    return Plan(DataShape(config.n_train, config.n_test, 2, 2), trainings)


def run(config: Config, seed: int) -> common.Outcome:
    split = common.spirals(config.n_train, config.n_test, seed, turns=config.turns)
    rows = []
    for variant in config.variants:
        for L in config.depths:
            common.stderr(f"{NAME}: training {variant}, {L} blocks")
            model = build(variant, L, config, jr.key(seed))
            trained = common.train(
                model,
                split,
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                seed=seed,
            )
            rows.append(
                {
                    "variant": variant,
                    "blocks": L,
                    "dt": config.T / L,
                    "parameters": common.parameter_count(trained.model),
                    "train_loss": trained.train["data_loss"],
                    "test_error": 1.0 - trained.test["accuracy"],
                    "seconds": round(trained.seconds, 2),
                }
            )
    summary = {
        variant: level_off(
            [r for r in rows if r["variant"] == variant], config.tolerance
        )
        for variant in config.variants
    }
    return common.Outcome(COLUMNS, rows, summary, _verdict(rows, summary, config))


def _verdict(rows, summary, config: Config) -> common.Verdict:
    parts, ok = [], []
    for variant in config.variants:
        part = [r for r in rows if r["variant"] == variant]
        shallow, deep = part[0]["test_error"], part[-1]["test_error"]
        level = summary[variant]
        ok.append(deep <= shallow - 0.05 and level["blocks"] > part[0]["blocks"])
        parts.append(
            f"{variant}: test error {shallow:.3f} at {part[0]['blocks']} block(s), "
            f"{deep:.3f} at {part[-1]['blocks']}, levelling off from "
            f"{level['blocks']} blocks (dt = {level['dt']:.3g})"
        )
    return common.Verdict(
        all(ok),
        "for every variant the deepest net's test error is at least 0.05 below the "
        "shallowest one's and the error levels off (within the tolerance of the "
        "best) only beyond the shallowest depth",
        "; ".join(parts),
    )


def plot(record: dict, path) -> None:
    rows, config = record["rows"], record["config"]
    fig, (ax, ax_loss) = common.figure(2, width=5.4, height=4.3)
    for i, variant in enumerate(config["variants"]):
        part = [r for r in rows if r["variant"] == variant]
        L = np.array([r["blocks"] for r in part])
        color = f"C{i}"
        counts = sorted({r["parameters"] for r in part})
        sizes = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        label = f"{variant} ({sizes} parameters)"
        ax.plot(L, [r["test_error"] for r in part], "o-", color=color, label=label)
        ax_loss.plot(L, [r["train_loss"] for r in part], "o-", color=color, label=label)
        level = record["summary"][variant]
        ax.axvline(level["blocks"], color=color, ls=":", lw=1.2)
        ax.annotate(
            f"levels off\ndt = {level['dt']:.3g}",
            (level["blocks"], level["best_test_error"]),
            xytext=(5, 25 + 25 * i),
            textcoords="offset points",
            color=color,
            fontsize=8,
        )
    for a in (ax, ax_loss):
        a.set_xscale("log", base=2)
        a.set_xticks(config["depths"], [str(d) for d in config["depths"]])
        a.minorticks_off()
        a.set_xlabel(f"Euler blocks L  (step dt = T / L, T = {config['T']:g})")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("test error (1 - accuracy)")
    ax.set_ylim(bottom=0)
    ax.set_title("test error against depth", fontsize=10)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (cross-entropy, full train set)")
    ax_loss.set_title("training loss against depth", fontsize=10)
    fig.suptitle(
        f"Experiment 2: {config['turns']:g}-turn spirals, fixed final time T: "
        "error against the number of Euler blocks"
    )
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
