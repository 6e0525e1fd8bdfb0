"""Experiment 4: ResNets train more easily than plain nets of equal depth.

Claim (docs/theory.md sec. 5 item 4): a ResNet deforms the data a little at a time
(each block is the identity plus `dt` times a velocity, eq. 14-17), so it trains
more easily than a plain net of the same depth, whose every layer is a finite map.

Plain ReLU MLPs (He-normal weights, zero biases: the standard start for ReLU) and
ReLU `flowjax.FlowNet` ResNets (`T = 1`, `dt = 1 / L`) with the same number `L` of
nonlinear layers, nearly the same number of parameters, trained by `flowjax.fit`
with the same optimizer, learning rate, batches and number of steps, on two
interleaved spirals. Reported: loss curves, final training loss and test accuracy.
"""

import dataclasses
import functools
import math
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from flowjax._classifier import FlowNet

from . import _common as common
from ._dry_run import DataShape, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "trainability"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "ResNets train more easily than plain nets of the same depth, because each "
    "block deforms the data only a little (theory sec. 5 item 4)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int
    n_test: int
    turns: float
    width: int
    depths: tuple[int, ...]
    steps: int
    batch_size: int
    learning_rate: float
    architectures: tuple[str, ...] = ("plain", "plain-default", "resnet")
    curve_points: int = 150


CONFIGS = {
    "tiny": Config(128, 256, 1.5, 8, (2, 4), 60, 64, 1e-3, ("plain", "resnet"), 30),
    "small": Config(1000, 2000, 1.5, 16, (4, 8, 16, 32, 64), 1500, 128, 1e-3),
    "large": Config(8000, 20000, 2.0, 64, (4, 8, 16, 32, 64, 128), 10000, 256, 1e-3),
}
ARCHITECTURES = {
    "plain": "plain, He init",
    "plain-default": "plain, eqx.nn.MLP default init",
    "resnet": "ResNet, dt = 1/L",
}
STYLES = {"plain": "--", "plain-default": ":", "resnet": "-"}
COLUMNS = (
    "architecture",
    "depth",
    "parameters",
    "initial_loss",
    "final_train_loss",
    "test_accuracy",
    "steps_to_loss_0.3",
    "seconds",
)
LOSS_LEVEL = 0.3


def default_plain_net(depth: int, width: int, key) -> eqx.nn.MLP:
    """A ReLU MLP `2 -> width x depth -> 2` as `eqx.nn.MLP` initializes it (weights
    and biases uniform on `+-1 / sqrt(fan_in)`)."""
    return eqx.nn.MLP(
        2, 2, width, depth, activation=jax.nn.relu, key=key, dtype=common.DTYPE
    )


def plain_net(depth: int, width: int, key) -> eqx.nn.MLP:
    """A ReLU MLP `2 -> width x depth -> 2` with He-normal weights and zero biases."""
    mlp = default_plain_net(depth, width, key)
    keys = jr.split(key, len(mlp.layers))
    layers = []
    for layer, k in zip(mlp.layers, keys, strict=True):
        fan_out, fan_in = layer.weight.shape
        W = jr.normal(k, (fan_out, fan_in), common.DTYPE) * math.sqrt(2.0 / fan_in)
        b = jnp.zeros(fan_out, common.DTYPE)
        layers.append(eqx.tree_at(lambda lin: (lin.weight, lin.bias), layer, (W, b)))
    return eqx.tree_at(lambda m: m.layers, mlp, tuple(layers))


def resnet(depth: int, width: int, key) -> FlowNet:
    """`depth` two-layer ReLU blocks of width `width` (hidden `width // 2`)."""
    return FlowNet.init(
        2,
        2,
        n=width,
        hidden=width // 2,
        num_blocks=depth,
        key=key,
        sigma=jax.nn.relu,
        T=1.0,
        dtype=common.DTYPE,
    )


BUILDERS = {"plain": plain_net, "plain-default": default_plain_net, "resnet": resnet}


def first_step_below(losses, level: float) -> int | None:
    """The first step (1-based) whose running mean loss is below `level`."""
    below = np.flatnonzero(common.smoothed(losses, 20) < level)
    return int(below[0]) + 1 if below.size else None


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): every architecture at every depth."""
    trainings = [
        Training(
            f"{architecture}, depth {depth}",
            functools.partial(BUILDERS[architecture], depth, config.width, jr.key(0)),
            dict(
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                task="classification",
            ),
        )
        for depth in config.depths
        for architecture in config.architectures
    ]
    return Plan(DataShape(config.n_train, config.n_test, 2, 2), trainings)


def run(config: Config, seed: int) -> common.Outcome:
    split = common.spirals(config.n_train, config.n_test, seed, turns=config.turns)
    rows, curves = [], {}
    for depth in config.depths:
        for architecture in config.architectures:
            common.stderr(f"{NAME}: training {architecture}, depth {depth}")
            build = BUILDERS[architecture]
            model = build(depth, config.width, jr.key(seed))
            trained = common.train(
                model,
                split,
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                seed=seed,
                task="classification",
            )
            losses = trained.history.steps["loss"]
            rows.append(
                {
                    "architecture": architecture,
                    "depth": depth,
                    "parameters": common.parameter_count(trained.model),
                    "initial_loss": losses[0],
                    "final_train_loss": trained.train["data_loss"],
                    "test_accuracy": trained.test["accuracy"],
                    "steps_to_loss_0.3": first_step_below(losses, LOSS_LEVEL),
                    "seconds": round(trained.seconds, 2),
                }
            )
            index = np.unique(
                np.geomspace(1, len(losses), config.curve_points).astype(int)
            )
            curves[f"{architecture} {depth}"] = {
                "step": index,
                "loss": common.smoothed(losses, 20)[index - 1],
            }
    summary = _summary(rows, config)
    return common.Outcome(
        COLUMNS, rows, summary, _verdict(summary, config), {"curves": curves}
    )


def _pick(rows, architecture: str, depth: int) -> dict:
    return next(
        r for r in rows if r["architecture"] == architecture and r["depth"] == depth
    )


def _summary(rows, config: Config) -> dict:
    return {
        architecture: {
            "test_accuracy": [
                _pick(rows, architecture, d)["test_accuracy"] for d in config.depths
            ],
            "final_train_loss": [
                _pick(rows, architecture, d)["final_train_loss"] for d in config.depths
            ],
        }
        for architecture in config.architectures
    } | {"depths": list(config.depths)}


def _verdict(summary, config: Config) -> common.Verdict:
    plain, res = summary["plain"], summary["resnet"]
    deep = [i for i, d in enumerate(config.depths) if d >= 16] or [
        len(config.depths) - 1
    ]
    lower = all(
        res["final_train_loss"][i] <= plain["final_train_loss"][i] for i in deep
    )
    margin = res["test_accuracy"][-1] - plain["test_accuracy"][-1]
    d0, d1 = config.depths[0], config.depths[-1]

    def path(s):
        return f"{s['test_accuracy'][0]:.3f} -> {s['test_accuracy'][-1]:.3f}"

    sentence = (
        f"test accuracy from depth {d0} to {d1}: plain (He init) {path(plain)}, "
        f"ResNet {path(res)}"
    )
    if "plain-default" in summary:
        sentence += f", plain (default init) {path(summary['plain-default'])}"
    sentence += (
        f"; final training loss at depth {d1}: plain (He) "
        f"{plain['final_train_loss'][-1]:.3g}, ResNet {res['final_train_loss'][-1]:.3g}"
    )
    return common.Verdict(
        lower and margin >= 0.05,
        "against the He-initialized plain net: the ResNet's final training loss is "
        "<= the plain net's at every depth >= 16, and at the largest depth its test "
        "accuracy is higher by >= 0.05",
        sentence,
    )


def plot(record: dict, path) -> None:
    curves, config = record["series"]["curves"], record["config"]
    depths, architectures = config["depths"], config["architectures"]
    fig, (ax, ax_acc) = common.figure(2, width=5.6, height=4.5)
    colors = {d: f"C{i}" for i, d in enumerate(depths)}
    for name, curve in curves.items():
        architecture, depth = name.split()
        ax.plot(
            curve["step"],
            curve["loss"],
            STYLES[architecture],
            color=colors[int(depth)],
            lw=1.3,
        )
    handles = [
        ax.plot([], [], "-", color=colors[d], label=f"depth {d}")[0] for d in depths
    ] + [
        ax.plot([], [], STYLES[a], color="k", label=ARCHITECTURES[a])[0]
        for a in architectures
    ]
    ax.legend(handles=handles, fontsize=7, ncols=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (Adam, same batches for all)")
    ax.set_ylabel("training loss (running mean of 20 steps)")
    ax.set_title("loss curves", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    summary = record["summary"]
    markers = {"plain": "s", "plain-default": "^", "resnet": "o"}
    for architecture in architectures:
        ax_acc.plot(
            depths,
            summary[architecture]["test_accuracy"],
            STYLES[architecture],
            marker=markers[architecture],
            label=ARCHITECTURES[architecture],
        )
    ax_acc.set_xscale("log", base=2)
    ax_acc.set_xticks(depths, [str(d) for d in depths])
    ax_acc.minorticks_off()
    ax_acc.set_ylim(0.4, 1.02)
    ax_acc.set_xlabel("depth L (nonlinear layers / residual blocks)")
    ax_acc.set_ylabel("final test accuracy")
    ax_acc.set_title(f"after {config['steps']} steps", fontsize=10)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.suptitle(
        "Experiment 4: plain ReLU nets against ResNets of equal depth on spirals"
    )
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
