"""Experiment 7: parameters of adjacent blocks differ by O(dt) when the field is smooth.

Claim (docs/theory.md sec. 2 and sec. 5): a ResNet that is Euler's method on a field
smooth in time has parameters at the same place in adjacent blocks that differ by
`O(dt)`; a plain net's weights `W_l` are not samples of such a field.

Measured as the adjacent-block difference of a stack of blocks `theta_1..theta_K`
(all parameters of a block in one vector),

    delta_k = |theta_{k+1} - theta_k| / mean_j |theta_j|,

for four families on two interleaved spirals:

- a plain ReLU MLP trained by `flowjax.fit` (its square hidden layers);
- the ResNet that refines it, `flowjax.refine(mlp, K, linear="flow",
  time_scaling="smooth", tied=False)`, for several `K`, within each stage (linear
  stages: rotations, stretch, translation; activation stages: ReLU blocks);
- `flowjax.FlowNet` ResNets of `L` blocks trained without and with the smoothness
  regularizer `S = sum_l |theta_{l+1} - theta_l|^2` (`fit(smoothness=...)`).
"""

import dataclasses
import functools
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from flowjax._classifier import FlowNet
from flowjax._refine import refine

from . import _common as common
from ._dry_run import DataShape, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "slow_parameters"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "parameters at the same place in adjacent blocks differ by O(dt) in a ResNet "
    "that discretizes a field smooth in time; a plain net's W_l are not samples of "
    "such a field (theory sec. 2, sec. 5)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int
    n_test: int
    width: int
    plain_hidden_layers: int
    refine_steps: tuple[int, ...]
    resnet_blocks: tuple[int, ...]
    smoothness: float
    steps: int
    batch_size: int
    learning_rate: float


CONFIGS = {
    "tiny": Config(128, 256, 4, 3, (2, 3), (3,), 1e-2, 40, 64, 1e-2),
    "small": Config(1000, 2000, 8, 8, (4, 16, 64), (8, 32), 1e-2, 1500, 128, 1e-2),
    "large": Config(
        8000, 20000, 16, 16, (4, 16, 64, 256), (8, 32, 128), 1e-2, 8000, 256, 5e-3
    ),
}
COLUMNS = (
    "family",
    "blocks",
    "differences",
    "median_delta",
    "p90_delta",
    "max_delta",
    "test_accuracy",
)
LINEAR_KINDS = ("LinearBlock", "DiagonalBlock", "TranslationBlock")
ZERO_DRAWN_AT = 1e-6


def adjacent_differences(stack: list[np.ndarray]) -> np.ndarray:
    """`delta_k = |theta_{k+1} - theta_k| / mean_j |theta_j|` for a stack of leaves
    with a common leading axis `K` (one block a row); empty if `K < 2` or all zero."""
    theta = np.concatenate([np.reshape(a, (a.shape[0], -1)) for a in stack], axis=1)
    scale = np.linalg.norm(theta, axis=1).mean()
    if theta.shape[0] < 2 or scale == 0:
        return np.zeros(0)
    return np.linalg.norm(np.diff(theta, axis=0), axis=1) / scale


def _stacked_leaves(tree, depth: int) -> list[np.ndarray]:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return [np.asarray(a) for a in leaves if a.ndim >= 1 and a.shape[0] == depth]


def plain_differences(mlp: eqx.nn.MLP) -> np.ndarray:
    """Differences between adjacent square hidden layers `(W_l, b_l)` of an MLP."""
    hidden = mlp.layers[1:-1]
    W = [np.asarray(layer.weight) for layer in hidden]
    b = [np.asarray(layer.bias) for layer in hidden]
    return adjacent_differences([np.stack(W), np.stack(b)])


def refined_differences(refined) -> dict[str, np.ndarray]:
    """Differences within every stage of a refined net, split into linear stages and
    activation stages."""
    parts: dict[str, list[np.ndarray]] = {"linear": [], "activation": []}
    for stage in refined.chain.stages:
        if stage.depth < 2:
            continue
        kind = "linear" if stage.block_kind in LINEAR_KINDS else "activation"
        parts[kind].append(adjacent_differences(_stacked_leaves(stage, stage.depth)))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def flownet_differences(net: FlowNet) -> np.ndarray:
    """Differences between adjacent blocks `(W1, b1, W2, b2)` of a FlowNet."""
    params = net.grid.params
    return adjacent_differences(_stacked_leaves(params, params.W1.shape[0]))


def _row(family: str, blocks: int, deltas: np.ndarray, accuracy) -> dict:
    def stat(f):
        return float(f(deltas)) if deltas.size else None

    return {
        "family": family,
        "blocks": blocks,
        "differences": int(deltas.size),
        "median_delta": stat(np.median),
        "p90_delta": stat(lambda d: np.quantile(d, 0.9)),
        "max_delta": stat(np.max),
        "test_accuracy": accuracy,
    }


@eqx.filter_jit
def _accuracy(model, X, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(X), axis=1) == y)


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): the plain net and every ResNet, with
    and without the smoothness regularizer (the refinements are not trained)."""
    options = dict(
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
    )
    plain = functools.partial(
        eqx.nn.MLP,
        2,
        2,
        config.width,
        config.plain_hidden_layers,
        activation=jax.nn.relu,
        key=jr.key(0),
        dtype=common.DTYPE,
    )
    trainings = [Training("plain net", plain, dict(options, task="classification"))] + [
        Training(
            f"ResNet, {L} blocks, smoothness {weight:g}",
            functools.partial(_resnet, config, L, jr.key(0)),
            dict(options, smoothness=weight),
        )
        for L in config.resnet_blocks
        for weight in (0.0, config.smoothness)
    ]
    return Plan(DataShape(config.n_train, config.n_test, 2, 2), trainings)


def _resnet(config: Config, L: int, key) -> FlowNet:
    """`L` two-layer ReLU blocks of width and hidden size `config.width`, T = 1."""
    return FlowNet.init(
        2,
        2,
        n=config.width,
        hidden=config.width,
        num_blocks=L,
        key=key,
        sigma=jax.nn.relu,
        T=1.0,
        dtype=common.DTYPE,
    )


def run(config: Config, seed: int) -> common.Outcome:
    split = common.spirals(config.n_train, config.n_test, seed)
    fit_options: dict[str, Any] = dict(
        sets=("test",),
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
    )
    rows, deltas = [], []
    common.stderr(f"{NAME}: training the plain net")
    mlp = eqx.nn.MLP(
        2,
        2,
        config.width,
        config.plain_hidden_layers,
        activation=jax.nn.relu,
        key=jr.key(seed),
        dtype=common.DTYPE,
    )
    plain = common.train(mlp, split, task="classification", **fit_options)
    d = plain_differences(plain.model)
    rows.append(
        _row("plain net", config.plain_hidden_layers, d, plain.test["accuracy"])
    )
    deltas.append(
        {"family": "plain net", "blocks": config.plain_hidden_layers, "deltas": d}
    )
    for K in config.refine_steps:
        common.stderr(f"{NAME}: refining it with K = {K}")
        refined = refine(
            plain.model, K, linear="flow", time_scaling="smooth", tied=False
        )
        accuracy = float(_accuracy(refined, split.X_test, split.y_test))
        for kind, d in refined_differences(refined).items():
            family = f"refined, {kind} stages"
            rows.append(_row(family, K, d, accuracy))
            deltas.append({"family": family, "blocks": K, "deltas": d})
    for L in config.resnet_blocks:
        for weight in (0.0, config.smoothness):
            family = "ResNet, trained" + (
                f" with smoothness {weight:g}" if weight else ""
            )
            common.stderr(f"{NAME}: training {family}, {L} blocks")
            net = _resnet(config, L, jr.key(seed))
            trained = common.train(net, split, smoothness=weight, **fit_options)
            d = flownet_differences(trained.model)
            rows.append(_row(family, L, d, trained.test["accuracy"]))
            deltas.append({"family": family, "blocks": L, "deltas": d})
    summary = _summary(rows, config)
    return common.Outcome(COLUMNS, rows, summary, _verdict(summary), {"deltas": deltas})


def _slope(rows, family: str) -> float | None:
    part = [r for r in rows if r["family"] == family and r["median_delta"]]
    if len(part) < 2:
        return None
    x = np.log([r["blocks"] for r in part])
    y = np.log([r["median_delta"] for r in part])
    return float(np.polyfit(x, y, 1)[0])


def _summary(rows, config: Config) -> dict:
    def median(family, blocks):
        row = next(r for r in rows if r["family"] == family and r["blocks"] == blocks)
        return row["median_delta"]

    K, L = config.refine_steps[-1], config.resnet_blocks[-1]
    smooth = f"ResNet, trained with smoothness {config.smoothness:g}"
    return {
        "plain_median": median("plain net", config.plain_hidden_layers),
        "refined_linear_median": median("refined, linear stages", K),
        "refined_activation_median": median("refined, activation stages", K),
        "trained_median": median("ResNet, trained", L),
        "smooth_trained_median": median(smooth, L),
        "slope_refined_linear": _slope(rows, "refined, linear stages"),
        "slope_refined_activation": _slope(rows, "refined, activation stages"),
        "slope_trained": _slope(rows, "ResNet, trained"),
        "slope_smooth_trained": _slope(rows, smooth),
        "largest_K": K,
        "largest_L": L,
    }


def _verdict(s) -> common.Verdict:
    slope = s["slope_refined_linear"]
    first_order = slope is not None and -1.3 <= slope <= -0.7
    separated = s["plain_median"] >= 10 * s["refined_linear_median"]

    def fmt(x):
        return "-" if x is None else f"{x:.3g}"

    sentence = (
        f"median delta: plain net {fmt(s['plain_median'])}; refined (K = "
        f"{s['largest_K']}) linear stages {fmt(s['refined_linear_median'])} (slope "
        f"{fmt(slope)} against K), activation stages "
        f"{fmt(s['refined_activation_median'])} (slope "
        f"{fmt(s['slope_refined_activation'])}); trained ResNet (L = "
        f"{s['largest_L']}) {fmt(s['trained_median'])} without and "
        f"{fmt(s['smooth_trained_median'])} with the smoothness regularizer"
    )
    return common.Verdict(
        first_order and separated,
        "the refined ResNet's linear-stage median delta falls like 1/K (log-log "
        "slope in [-1.3, -0.7]) and the plain net's median delta is >= 10 times it",
        sentence,
    )


def _label(entry: dict) -> str:
    family, blocks = entry["family"], entry["blocks"]
    if family == "plain net":
        return f"plain net ({blocks} hidden layers)"
    symbol = "K" if family.startswith("refined") else "L"
    return f"{family}, {symbol} = {blocks}"


def plot(record: dict, path) -> None:
    deltas, rows = record["series"]["deltas"], record["rows"]
    fig, (ax, ax_scale) = common.figure(2, width=5.8, height=4.6)
    shown = [entry for entry in deltas if len(entry["deltas"])]
    names = [_label(entry) for entry in shown]
    data = [np.maximum(np.asarray(entry["deltas"]), ZERO_DRAWN_AT) for entry in shown]
    ax.boxplot(data, vert=False, whis=(5, 95))
    ax.axvline(ZERO_DRAWN_AT, color="0.5", ls=":", lw=1)
    ax.set_yticks(np.arange(1, len(names) + 1), names, fontsize=7)
    ax.set_xscale("log")
    zero = f"(values below {ZERO_DRAWN_AT:g}, zeros too, drawn at it)"
    ax.set_xlabel(f"delta = |theta_(k+1) - theta_k| / mean |theta|  {zero}")
    ax.set_title("adjacent-block differences (box 25-75%, whiskers 5-95%)", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    families = sorted({r["family"] for r in rows if r["family"] != "plain net"})
    for i, family in enumerate(families):
        part = [r for r in rows if r["family"] == family and r["median_delta"]]
        if not part:
            continue
        blocks = [r["blocks"] for r in part]
        ax_scale.loglog(
            blocks, [r["median_delta"] for r in part], "o-", color=f"C{i}", label=family
        )
    plain = next(r for r in rows if r["family"] == "plain net")
    ax_scale.axhline(
        plain["median_delta"], color="k", ls="--", lw=1, label="plain net (median)"
    )
    refined = [r for r in rows if r["family"] == "refined, linear stages"]
    if refined and refined[0]["median_delta"]:
        K = np.array([r["blocks"] for r in refined], dtype=float)
        ax_scale.loglog(
            K,
            refined[0]["median_delta"] * K[0] / K,
            ":",
            color="0.4",
            label="slope -1 (O(dt))",
        )
    ax_scale.set_xscale("log", base=2)
    ax_scale.set_xlabel("blocks per stage K (refined) or per net L (trained)")
    ax_scale.set_ylabel("median delta")
    ax_scale.set_title("median difference against the number of blocks", fontsize=9)
    ax_scale.grid(True, which="both", alpha=0.3)
    ax_scale.legend(fontsize=7)
    fig.suptitle("Experiment 7: do parameters vary slowly from block to block?")
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
