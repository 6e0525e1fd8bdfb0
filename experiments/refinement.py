"""Experiment 3: ResNets are deeper than plain nets because they refine them.

Claim (docs/theory.md sec. 5 item 3, sec. 4): Euler's method on the flow of a plain
net turns each layer into a stack of residual blocks (eq. 51-58), so a plain net of
`L` layers *is* a ResNet of many more blocks, up to a measurable error.

Plain ReLU MLPs of increasing depth are trained on scikit-learn's digits by
`flowjax.fit`, then refined by `flowjax.refine` with both linear options and
certified by `flowjax._certificate.certify` on the test set: the certificate measures
`max |refined - plain|` at `num_steps / 4`, `num_steps / 2` and `num_steps` and fits
the order. Reported: residual blocks, accuracy of the plain net and of its
refinement, agreement of their predictions, the certificate.
"""

import dataclasses
import functools
import sys

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from flowjax._certificate import certify

from . import _common as common
from ._dry_run import DIGITS, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "refinement"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "a plain net is reproduced by the ResNet that refines its flow (Euler steps on "
    "each stage), a much deeper net with the same predictions (theory sec. 5 item "
    "3, sec. 4)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    hidden_layers: tuple[int, ...]
    steps: int
    batch_size: int
    learning_rate: float
    linear: tuple[str, ...]
    num_steps_whole: int
    num_steps_flow: int


CONFIGS = {
    "tiny": Config(8, (1, 2), 40, 64, 3e-3, ("whole", "flow"), 2, 4),
    "small": Config(32, (1, 2, 4, 8), 1500, 64, 1e-3, ("whole", "flow"), 16, 256),
    "large": Config(64, (1, 2, 4, 8, 16), 6000, 64, 1e-3, ("whole", "flow"), 64, 4096),
}
COLUMNS = (
    "plain_layers",
    "linear",
    "num_steps",
    "residual_blocks",
    "non_residual_maps",
    "plain_accuracy",
    "refined_accuracy",
    "agreement",
    "max_deviation",
    "fitted_order",
)


@eqx.filter_jit
def _batched(model, X):
    return jax.vmap(model)(X)


def _logits(model, X: np.ndarray) -> np.ndarray:
    return np.asarray(_batched(model, X))


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): one plain net per hidden-layer count
    (the refinements and certificates are not part of the dry run)."""
    trainings = [
        Training(
            f"plain net, {hidden} hidden layer(s)",
            functools.partial(
                eqx.nn.MLP,
                64,
                10,
                config.width,
                hidden,
                activation=jax.nn.relu,
                key=jr.key(0),
                dtype=common.DTYPE,
            ),
            dict(
                steps=config.steps,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                task="classification",
            ),
        )
        for hidden in config.hidden_layers
    ]
    return Plan(DIGITS, trainings)


def run(config: Config, seed: int) -> common.Outcome:
    split = common.digits(seed)
    rows, certificates = [], []
    for hidden in config.hidden_layers:
        common.stderr(f"{NAME}: training a plain net with {hidden} hidden layer(s)")
        mlp = eqx.nn.MLP(
            64,
            10,
            config.width,
            hidden,
            activation=jax.nn.relu,
            key=jr.key(seed),
            dtype=common.DTYPE,
        )
        trained = common.train(
            mlp,
            split,
            steps=config.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            seed=seed,
            task="classification",
            sets=("test",),
        )
        plain = _logits(trained.model, split.X_test).argmax(axis=1)
        for linear in config.linear:
            K = config.num_steps_whole if linear == "whole" else config.num_steps_flow
            common.stderr(f"{NAME}: refining it with linear={linear!r}, K={K}")
            refined, cert = certify(trained.model, K, split.X_test, linear=linear)
            predicted = _logits(refined, split.X_test).argmax(axis=1)
            rows.append(
                {
                    "plain_layers": hidden + 1,
                    "linear": linear,
                    "num_steps": K,
                    "residual_blocks": cert.depth,
                    "non_residual_maps": refined.num_non_residual,
                    "plain_accuracy": trained.test["accuracy"],
                    "refined_accuracy": float(np.mean(predicted == split.y_test)),
                    "agreement": float(np.mean(predicted == plain)),
                    "max_deviation": cert.deviation,
                    "fitted_order": cert.order,
                }
            )
            certificates.append(
                {
                    "plain_layers": hidden + 1,
                    "linear": linear,
                    "num_steps": list(cert.num_steps),
                    "deviations": list(cert.deviations),
                    "rounding_level": cert.rounding_level,
                    "exact_by_construction": cert.exact_by_construction,
                }
            )
    summary = {
        "min_agreement": min(r["agreement"] for r in rows),
        "max_accuracy_change": max(
            abs(r["plain_accuracy"] - r["refined_accuracy"]) for r in rows
        ),
        "deepest_resnet_blocks": max(r["residual_blocks"] for r in rows),
    }
    return common.Outcome(
        COLUMNS, rows, summary, _verdict(rows, summary), {"certificates": certificates}
    )


def _verdict(rows, summary) -> common.Verdict:
    kept = summary["max_accuracy_change"] <= 0.01 and summary["min_agreement"] >= 0.99
    deepest = max(rows, key=lambda r: r["residual_blocks"])
    flow = [r for r in rows if r["linear"] == "flow" and r["fitted_order"] is not None]
    orders = ", ".join(f"{r['fitted_order']:.2f}" for r in flow) or "none fitted"
    sentence = (
        f"every refinement kept the plain net's test accuracy within "
        f"{summary['max_accuracy_change']:.3f} and agreed on at least "
        f"{summary['min_agreement']:.3f} of the test predictions, up to "
        f"{deepest['residual_blocks']} residual blocks for a "
        f"{deepest['plain_layers']}-layer plain net; fitted orders of the 'flow' "
        f"certificates: {orders}"
    )
    return common.Verdict(
        kept,
        "every refined net keeps the test accuracy within 0.01 and agrees with the "
        "plain net on >= 99% of the test predictions",
        sentence,
    )


def plot(record: dict, path) -> None:
    certificates, rows = record["series"]["certificates"], record["rows"]
    fig, (ax, ax_depth) = common.figure(2, width=5.6, height=4.4)
    layers = sorted({c["plain_layers"] for c in certificates})
    floor = min(c["rounding_level"] for c in certificates)
    exact_labelled = False
    for c in certificates:
        deviations = np.maximum(c["deviations"], floor)
        if c["linear"] == "whole" and max(c["deviations"]) <= c["rounding_level"]:
            label = None if exact_labelled else "linear='whole', every depth: exact"
            exact_labelled = True
            ax.loglog(c["num_steps"], deviations, "s--", color="0.3", label=label)
            continue
        color = f"C{layers.index(c['plain_layers'])}"
        label = f"{c['plain_layers']} layers, linear='{c['linear']}'"
        ax.loglog(c["num_steps"], deviations, "o-", color=color, label=label)
    ax.axhline(floor, color="0.5", ls=":", lw=1, label="float32 rounding level")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_steps K (Euler steps per stage)")
    ax.set_ylabel("certificate: max |refined - plain| logit (test set)")
    ax.set_title("error certificate ('whole' is exact for ReLU)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for i, linear in enumerate(record["config"]["linear"]):
        part = [r for r in rows if r["linear"] == linear]
        x = np.array([r["plain_layers"] for r in part])
        blocks = np.array([r["residual_blocks"] for r in part])
        ax_depth.plot(x, blocks, "o-", color=f"C{i + 5}", label=f"linear='{linear}'")
        for r in part:
            ax_depth.annotate(
                f"acc {r['refined_accuracy']:.3f}\n(plain {r['plain_accuracy']:.3f})",
                (r["plain_layers"], r["residual_blocks"]),
                fontsize=6.5,
                xytext=(4, -14 if linear == "whole" else 4),
                textcoords="offset points",
            )
    ax_depth.set_xscale("log", base=2)
    ax_depth.set_yscale("log")
    ax_depth.set_xticks(layers, [str(x) for x in layers])
    ax_depth.minorticks_off()
    ax_depth.set_xlabel("layers of the plain net")
    ax_depth.set_ylabel("residual blocks of its refinement")
    ax_depth.set_title("depth of the refined ResNet (test accuracy kept)", fontsize=10)
    ax_depth.grid(True, alpha=0.3)
    ax_depth.legend(fontsize=8, loc="center right")
    ax_depth.margins(x=0.25, y=0.35)
    fig.suptitle("Experiment 3: plain ReLU nets on digits refined into ResNets")
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
