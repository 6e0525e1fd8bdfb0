"""Experiment 1: one-layer ReLU blocks can only push coordinates one way.

Claim (docs/theory.md sec. 5 item 1): in a two-layer block `y + dt (W2 sigma(W1 y +
b1) + b2)` (eq. 14-17) the inner weights place a velocity and the outer weights set
its direction, while a one-layer block `y + dt sigma(W y + b)` with ReLU has a
velocity `>= 0` in every coordinate: it can only move points up.

Task: `swap_halves` with the output function fixed to `f(y) = (-y_1, y_1)` (the
terminal condition of the transport is given, sec. 1): every point must cross to the
other half plane, so the left half moves right and the right half moves left. With
one-layer ReLU blocks `y_1` never decreases, which bounds the accuracy by the share of
points that must move right and the loss from below by the mean of
`softplus(2 x_1)` over the points that must move left. Three block types at equal
parameter counts, each also with a trained linear readout (a control: a readout can
flip the sign, so there the one-way push costs nothing).
"""

import dataclasses
import functools
import math
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from flowjax._resnet import EulerResNet
from flowjax._two_layer import TwoLayerField, TwoLayerParams

from . import _common as common
from ._dry_run import DataShape, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "two_layer_blocks"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "a one-layer ReLU block y + dt relu(W y + b) can only move coordinates one way; "
    "a symmetric activation (tanh) or a two-layer block W2 relu(W1 y + b1) moves "
    "them both ways (theory sec. 5 item 1)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int
    n_test: int
    T: float
    one_layer_blocks: int
    two_layer_blocks: int
    hidden: int
    steps: int
    batch_size: int
    learning_rate: float
    readouts: tuple[str, ...] = ("fixed", "trained")


# n = 2: a one-layer block has n^2 + n = 6 numbers, a two-layer block with 4 hidden
# units 2 * 4 * 2 + 4 + 2 = 22, so 11 one-layer blocks weigh as much as 3 two-layer.
CONFIGS = {
    "tiny": Config(128, 256, 4.0, 11, 3, 4, 60, 64, 1e-2, readouts=("fixed",)),
    "small": Config(512, 2000, 4.0, 22, 6, 4, 1500, 128, 1e-2),
    "large": Config(4096, 20000, 4.0, 44, 12, 4, 6000, 256, 5e-3),
}
BLOCKS = ("one-layer relu", "one-layer tanh", "two-layer relu")
COLUMNS = (
    "block",
    "readout",
    "blocks",
    "parameters",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "accuracy_bound",
    "loss_floor",
    "seconds",
)


class OneLayerField(eqx.Module):
    """The one-layer velocity `v(y) = sigma(W y + b)` with `args = (W, b)`."""

    sigma: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(self, t, y: Float[Array, " n"], args) -> Float[Array, " n"]:
        del t
        W, b = args
        return self.sigma(W @ y + b)


class BlockNet(eqx.Module):
    """An Euler ResNet (eq. 10-17) followed by the fixed output `(-y_1, y_1)` or a
    trained linear readout `W_out y + b_out`."""

    resnet: EulerResNet
    W_out: Float[Array, "2 n"] | None
    b_out: Float[Array, " 2"] | None
    task: str = eqx.field(static=True, default="classification")

    def __call__(self, x: Float[Array, " n"]) -> Float[Array, " 2"]:
        y = self.resnet(x)
        if self.W_out is None or self.b_out is None:
            return jnp.stack([-y[0], y[0]])
        return self.W_out @ y + self.b_out

    def trainable_spec(self) -> "BlockNet":
        """The block parameters and the readout; not the time grid."""
        spec = jax.tree.map(lambda _: False, self)
        return eqx.tree_at(
            lambda m: (m.resnet.params, m.W_out, m.b_out),
            spec,
            (
                jax.tree.map(eqx.is_inexact_array, self.resnet.params),
                self.W_out is not None,
                self.b_out is not None,
            ),
            is_leaf=lambda x: x is None,
        )


def build(block: str, readout: str, config: Config, key) -> BlockNet:
    """One of the three block types with `readout` ('fixed' or 'trained')."""
    n, dtype = 2, common.DTYPE
    k_field, k_out = jr.split(key)
    if block.startswith("one-layer"):
        L = config.one_layer_blocks
        sigma = jax.nn.relu if block.endswith("relu") else jnp.tanh
        W = jr.normal(k_field, (L, n, n), dtype) / math.sqrt(n)
        params, field = (W, jnp.zeros((L, n), dtype)), OneLayerField(sigma)
    else:
        L = config.two_layer_blocks
        params = TwoLayerParams.init(
            n, config.hidden, key=k_field, num_blocks=L, dtype=dtype
        )
        field = TwoLayerField(jax.nn.relu)
    ts = jnp.linspace(0.0, config.T, L + 1, dtype=dtype)
    resnet = EulerResNet(field, params, ts)
    if readout == "fixed":
        return BlockNet(resnet, None, None)
    W_out = jr.normal(k_out, (2, n), dtype) / math.sqrt(n)
    return BlockNet(resnet, W_out, jnp.zeros(2, dtype))


def relu_bounds(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy bound and loss floor of one-layer ReLU blocks with `f = (-y1, y1)`.

    `y_1` only grows, so a point that starts at `x_1 > 0` with label 0 (it must end
    at `y_1 < 0`) is always misclassified and costs at least `softplus(2 x_1)`.
    """
    stuck = (y == 0) & (X[:, 0] > 0)
    accuracy = 1.0 - float(np.mean(stuck))
    floor = float(np.mean(np.where(stuck, np.logaddexp(0.0, 2 * X[:, 0]), 0.0)))
    return accuracy, floor


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): every block with every readout."""
    trainings = [
        Training(
            f"{block}, {readout} readout",
            functools.partial(build, block, readout, config, jr.key(i)),
            dict(
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
            ),
        )
        for readout in config.readouts
        for i, block in enumerate(BLOCKS)
    ]
    return Plan(DataShape(config.n_train, config.n_test, 2, 2), trainings)


def run(config: Config, seed: int) -> common.Outcome:
    split = common.swap_halves(config.n_train, config.n_test, seed)
    bound_test, _ = relu_bounds(*split.test)
    _, floor_train = relu_bounds(*split.train)
    rows, states = [], {}
    for readout in config.readouts:
        for i, block in enumerate(BLOCKS):
            common.stderr(f"{NAME}: training {block}, {readout} readout")
            model = build(block, readout, config, jr.key(seed * 1000 + i))
            trained = common.train(
                model,
                split,
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                seed=seed,
            )
            one_way = block == "one-layer relu" and readout == "fixed"
            rows.append(
                {
                    "block": block,
                    "readout": readout,
                    "blocks": trained.model.resnet.depth,
                    "parameters": common.parameter_count(trained.model),
                    "train_loss": trained.train["data_loss"],
                    "test_loss": trained.test["data_loss"],
                    "test_accuracy": trained.test["accuracy"],
                    "accuracy_bound": bound_test if one_way else None,
                    "loss_floor": floor_train if one_way else None,
                    "seconds": round(trained.seconds, 2),
                }
            )
            if readout == "fixed":
                X = split.X_test[:400]
                states[block] = np.asarray(jax.vmap(trained.model.resnet)(X))
    return common.Outcome(
        COLUMNS,
        rows,
        _summary(rows),
        _verdict(rows),
        {
            "start": split.X_test[:400],
            "labels": split.y_test[:400],
            "final_states": states,
        },
    )


def _row(rows, block: str, readout: str) -> dict:
    return next(r for r in rows if r["block"] == block and r["readout"] == readout)


def _summary(rows) -> dict:
    relu = _row(rows, "one-layer relu", "fixed")
    return {
        "fixed_readout_accuracy": {
            b: _row(rows, b, "fixed")["test_accuracy"] for b in BLOCKS
        },
        "trained_readout_accuracy": {
            r["block"]: r["test_accuracy"] for r in rows if r["readout"] == "trained"
        },
        "relu_accuracy_bound": relu["accuracy_bound"],
        "relu_loss_floor": relu["loss_floor"],
        "relu_train_loss_above_floor": relu["train_loss"] >= relu["loss_floor"] - 1e-4,
        "equal_parameters": len({r["parameters"] for r in rows}) == 1,
    }


def _verdict(rows) -> common.Verdict:
    relu = _row(rows, "one-layer relu", "fixed")
    tanh = _row(rows, "one-layer tanh", "fixed")["test_accuracy"]
    two = _row(rows, "two-layer relu", "fixed")["test_accuracy"]
    held = relu["test_accuracy"] <= relu["accuracy_bound"] + 0.02
    both_ways = min(tanh, two) >= 0.95
    sentence = (
        f"with the output fixed, one-layer ReLU blocks reach test accuracy "
        f"{relu['test_accuracy']:.3f} (bound {relu['accuracy_bound']:.3f}, train "
        f"loss {relu['train_loss']:.3f} >= floor {relu['loss_floor']:.3f}) while "
        f"one-layer tanh reaches {tanh:.3f} and two-layer ReLU {two:.3f} at the same "
        f"parameter count"
    )
    return common.Verdict(
        held and both_ways,
        "fixed output: one-layer ReLU accuracy <= its bound + 0.02, and both "
        "one-layer tanh and two-layer ReLU >= 0.95",
        sentence,
    )


def plot(record: dict, path) -> None:
    series, rows = record["series"], record["rows"]
    fig, axes = common.figure(4, width=3.6, height=3.9)
    start, labels = np.asarray(series["start"]), np.asarray(series["labels"])
    for ax, block in zip(axes[:3], BLOCKS, strict=True):
        end = np.asarray(series["final_states"][block])
        for c, color, text in (
            (1, "C0", "must move right"),
            (0, "C3", "must move left"),
        ):
            mask = labels == c
            ax.scatter(*end[mask].T, s=5, c=color, label=f"label {c}: {text}")
            ax.scatter(*start[mask].T, s=2, c=color, alpha=0.15)
        ax.axvline(0.0, color="k", lw=1, ls="--")
        accuracy = _row(rows, block, "fixed")["test_accuracy"]
        ax.set_title(f"{block}: final states\ntest accuracy {accuracy:.3f}", fontsize=9)
        ax.set_xlabel("y1 at time T (output reads sign of y1)")
        ax.set_ylabel("y2 at time T")
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[3]
    x = np.arange(len(BLOCKS))
    readouts = record["config"]["readouts"]
    for j, readout in enumerate(readouts):
        acc = [_row(rows, b, readout)["test_accuracy"] for b in BLOCKS]
        width = 0.76 / len(readouts)
        offset = (j - (len(readouts) - 1) / 2) * width
        ax.bar(x + offset, acc, width, label=f"{readout} output")
    bound = _row(rows, "one-layer relu", "fixed")["accuracy_bound"]
    ax.axhline(bound, color="k", ls=":", lw=1, label="one-way bound (ReLU)")
    ax.set_xticks(x, [b.replace(" ", "\n", 1) for b in BLOCKS], fontsize=8)
    ax.set_ylim(0, 1.35)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy, equal parameter counts", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    fig.suptitle(
        "Experiment 1: one-layer ReLU blocks push one way (faint: start, solid: end)"
    )
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
