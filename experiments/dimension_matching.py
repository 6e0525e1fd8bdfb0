"""Experiment 6: dimension matching, the concentric annuli need a third dimension.

Claim (docs/theory.md sec. 5 item 8): the flow model embeds the data in one ambient
dimension `n`; a flow is a homeomorphism of `R^n`, so in the plane (`n = 2`) it
cannot carry a disc out of the ring around it, and a linear readout cannot separate
them. Padding with zeros to `n = 3` or `4` gives the flow room to lift the disc out
of the plane.

`flowjax.FlowNet` (tanh two-layer field, `blocks` parameter sets linear in time, a
trained linear readout) trained by `flowjax.fit` as an Euler ResNet of `euler_steps`
small steps, with a light kinetic-energy regularizer so that the trained ResNet stays
close to its flow, at `n = 2, 3, 4`. An Euler map with large steps need not be a
homeomorphism (it can fold the plane), so the claim is checked on the continuous
flow: reported are the test accuracy of the trained ResNet and of the flow of the
same field (adaptive Tsit5 solve, `net.replace(method="adaptive")`), and the number
of function evaluations of that solve per example, `NFE = 6 x steps + 1` with `steps`
diffrax's count from `FlowNet.transport_with_stats` (Tsit5 has six new stages a step,
first-same-as-last, plus the first stage; tests/test_training.py checks this against
a count of the field's calls, accepted and rejected steps alike).
"""

import dataclasses
import functools
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from flowjax._classifier import FlowNet
from flowjax._transport import Integrator

from . import _common as common
from ._dry_run import DataShape, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "dimension_matching"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "a flow in the plane cannot carry the inner disc out of the surrounding ring; "
    "zero-padding to n = 3 or 4 lets it (theory sec. 5 item 8)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int
    n_test: int
    dims: tuple[int, ...]
    num_seeds: int
    hidden: int
    blocks: int
    euler_steps: int
    kinetic: float
    T: float
    steps: int
    batch_size: int
    learning_rate: float
    rtol: float = 1e-5
    atol: float = 1e-7
    grid_points: int = 60


CONFIGS = {
    "tiny": Config(
        128, 256, (2, 3), 1, 8, 4, 8, 0.01, 1.0, 60, 64, 1e-2, grid_points=20
    ),
    "small": Config(1000, 2000, (2, 3, 4), 2, 16, 10, 64, 0.01, 1.0, 1500, 128, 1e-2),
    "large": Config(
        8000, 20000, (2, 3, 4, 8), 5, 32, 20, 256, 0.01, 1.0, 8000, 256, 5e-3
    ),
}
COLUMNS = (
    "n",
    "seed",
    "parameters",
    "train_loss",
    "test_accuracy",
    "flow_test_accuracy",
    "nfe_mean",
    "nfe_max",
    "seconds",
)
NFE_PER_STEP, NFE_EXTRA = 6, 1


def build(n: int, config: Config, key) -> FlowNet:
    return FlowNet.init(
        2,
        2,
        n=n,
        hidden=config.hidden,
        num_blocks=config.blocks,
        key=key,
        T=config.T,
        interpolation="linear",
        num_steps=config.euler_steps,
        dtype=common.DTYPE,
    )


@eqx.filter_jit
def adaptive_predictions(net: FlowNet, X, rtol: float, atol: float):
    """Logits of the continuous flow of `net`'s field (its parameter sets, linear in
    time) and the solver steps each example took."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    flow = net.replace(
        method="adaptive", integrator=Integrator(stepsize_controller=controller)
    )

    def one(x):
        y, stats = flow.transport_with_stats(flow.embed(x))
        return flow.readout(y), stats["num_steps"]

    return jax.vmap(one)(X)


@eqx.filter_jit
def predicted_class(net: FlowNet, X):
    return jnp.argmax(jax.vmap(net)(X), axis=1)


def input_grid(points: int) -> np.ndarray:
    """A `points x points` grid of the square `[-2.2, 2.2]^2`, shape `(points^2, 2)`."""
    g = np.linspace(-2.2, 2.2, points, dtype=np.float32)
    return np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): every dimension `n`, `num_seeds` times
    (the adaptive solves of the trained flows are not part of the dry run)."""
    trainings = [
        Training(
            f"n = {n}",
            functools.partial(build, n, config, jr.key(0)),
            dict(
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                kinetic=config.kinetic,
            ),
            runs=config.num_seeds,
        )
        for n in config.dims
    ]
    return Plan(DataShape(config.n_train, config.n_test, 2, 2), trainings)


def run(config: Config, seed: int) -> common.Outcome:
    rows, regions = [], {}
    grid = input_grid(config.grid_points)
    for s in common.seeds_of(seed, config.num_seeds):
        split = common.annuli(config.n_train, config.n_test, s)
        for n in config.dims:
            common.stderr(f"{NAME}: training n = {n}, seed {s}")
            trained = common.train(
                build(n, config, jr.key(s)),
                split,
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                seed=s,
                kinetic=config.kinetic,
            )
            logits, steps = adaptive_predictions(
                trained.model, split.X_test, config.rtol, config.atol
            )
            nfe = NFE_PER_STEP * np.asarray(steps) + NFE_EXTRA
            flow_accuracy = np.mean(np.argmax(logits, axis=1) == split.y_test)
            rows.append(
                {
                    "n": n,
                    "seed": s,
                    "parameters": common.parameter_count(trained.model),
                    "train_loss": trained.train["data_loss"],
                    "test_accuracy": trained.test["accuracy"],
                    "flow_test_accuracy": float(flow_accuracy),
                    "nfe_mean": float(nfe.mean()),
                    "nfe_max": int(nfe.max()),
                    "seconds": round(trained.seconds, 2),
                }
            )
            if s == seed:
                regions[str(n)] = np.asarray(predicted_class(trained.model, grid))
    summary = {
        str(n): {
            key: float(np.mean([r[key] for r in rows if r["n"] == n]))
            for key in ("test_accuracy", "flow_test_accuracy", "nfe_mean")
        }
        for n in config.dims
    }
    data = common.annuli(config.n_train, config.n_test, seed)
    series = {
        "grid_points": config.grid_points,
        "regions": regions,
        "X_test": data.X_test[:300],
        "y_test": data.y_test[:300],
    }
    return common.Outcome(COLUMNS, rows, summary, _verdict(summary, config), series)


def _verdict(summary, config: Config) -> common.Verdict:
    plane = summary["2"]
    lifted = [summary[str(n)] for n in config.dims if n > 2]
    worst = min(s["flow_test_accuracy"] for s in lifted)

    def each(key, digits=3):
        return ", ".join(
            f"n = {n}: {summary[str(n)][key]:.{digits}f}" for n in config.dims
        )

    sentence = (
        f"test accuracy of the continuous flow {each('flow_test_accuracy')}, of the "
        f"Euler ResNet ({config.euler_steps} steps) {each('test_accuracy')}; mean "
        f"NFE of the adaptive solve {each('nfe_mean', 0)} (means over seeds)"
    )
    return common.Verdict(
        worst >= 0.995 and plane["flow_test_accuracy"] <= worst - 0.005,
        "the continuous flow (the object of the topological argument) reaches >= "
        "0.995 test accuracy in every padded dimension and n = 2 stays at least "
        "0.005 below the worst padded one",
        sentence,
    )


def plot(record: dict, path) -> None:
    series, config, summary = record["series"], record["config"], record["summary"]
    dims = config["dims"]
    fig, axes = common.figure(len(dims) + 1, width=3.7, height=3.9)
    points = series["grid_points"]
    g = np.linspace(-2.2, 2.2, points)
    X, y = np.asarray(series["X_test"]), np.asarray(series["y_test"])
    for ax, n in zip(axes, dims, strict=False):
        region = np.asarray(series["regions"][str(n)]).reshape(points, points)
        ax.contourf(
            g, g, region, levels=[-0.5, 0.5, 1.5], colors=["#c6dbef", "#fcbba1"]
        )
        for c, color, text in (
            (0, "C0", "disc (label 0)"),
            (1, "C3", "ring (label 1)"),
        ):
            ax.scatter(*X[y == c].T, s=4, color=color, label=text)
        accuracy = summary[str(n)]["test_accuracy"]
        ax.set_title(
            f"n = {n}: class predicted by the ResNet\ntest accuracy {accuracy:.3f}",
            fontsize=9,
        )
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[-1]
    error = [100 * (1 - summary[str(n)]["test_accuracy"]) for n in dims]
    flow_error = [100 * (1 - summary[str(n)]["flow_test_accuracy"]) for n in dims]
    x = np.arange(len(dims))
    ax.bar(x - 0.2, error, 0.4, label="test error, Euler ResNet")
    ax.bar(x + 0.2, flow_error, 0.4, label="test error, adaptive flow")
    ax.set_ylim(0.0, 2.0 * max(*error, *flow_error, 0.5))
    ax.set_xticks(x, [f"n = {n}" for n in dims])
    ax.set_ylabel("test error in % (mean over seeds)")
    nfe = [summary[str(n)]["nfe_mean"] for n in dims]
    nfe_axis = ax.twinx()
    nfe_axis.plot(x, nfe, "ko-", label="function evaluations (flow)")
    nfe_axis.set_ylabel("function evaluations per example (Tsit5)")
    nfe_axis.set_ylim(0, 1.6 * max(nfe))
    handles = ax.get_legend_handles_labels()
    more = nfe_axis.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper right")
    ax.set_title("error and cost against n", fontsize=9)
    fig.suptitle(
        "Experiment 6: concentric annuli, flows in n = 2 against zero-padded n"
    )
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
