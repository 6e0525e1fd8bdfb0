"""Experiment 5: dissipation (noise in the transport) regularizes like dropout.

Claim (docs/theory.md sec. 5 item 5): adding a diffusion term to the transport, i.e.
making the characteristics an SDE `dy = v(y, t) dt + eps dW`, regularizes as dropout
does.

One architecture, three ways to train it: an Euler ResNet of two-layer ReLU blocks
(eq. 14-17, `dt = T / L`) with a trained linear readout, on a small training set
(`per_class` digits of each class), trained

- with nothing (`neither`);
- with dropout of the hidden units of every block (inverted dropout, rate `p`);
- with noise in the transport: a diffrax SDE, `diffrax.MultiTerm(ODETerm(drift),
  ControlTerm(eps I, VirtualBrownianTree))` solved by `diffrax.Euler` on the blocks'
  time grid (`diffrax.StepTo`), a fresh Brownian path per example and step.

At test time every variant runs the deterministic ResNet (no dropout, no noise).
Several seeds (each: its own training subset, initialization and noise); reported:
mean and spread of test accuracy, and the gain over `neither` paired by seed.

Training is full-batch Adam by `flowjax.fit(..., stochastic=True)`, which gives the
model a fresh key for every example and step; `flowjax.evaluate` tests it without a
key, i.e. deterministically. The seeds of one variant share one compiled step.
"""

import dataclasses
import functools
import math
import sys
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from flowjax._two_layer import TwoLayerParams, two_layer_velocity

from . import _common as common
from ._dry_run import DIGITS, Plan, Training
from ._registry import EXPERIMENTS, main as _main


NAME = "dissipation"
DESCRIPTION = EXPERIMENTS[NAME][0]
CLAIM = (
    "noise in the feed-forward transport (an SDE with small diffusion) regularizes "
    "like dropout (theory sec. 5 item 5)"
)


@dataclasses.dataclass(frozen=True)
class Config:
    per_class: int
    num_seeds: int
    blocks: int
    hidden: int
    T: float
    steps: int
    learning_rate: float
    dropout_rates: tuple[float, ...]
    noise_levels: tuple[float, ...]


CONFIGS = {
    "tiny": Config(3, 2, 2, 8, 1.0, 20, 1e-3, (0.2,), (0.5,)),
    "small": Config(10, 5, 8, 32, 1.0, 800, 1e-3, (0.1, 0.3), (0.3, 1.0)),
    "large": Config(
        20, 20, 16, 64, 1.0, 4000, 1e-3, (0.1, 0.2, 0.3, 0.5), (0.1, 0.3, 0.6, 1.0, 2.0)
    ),
}
COLUMNS = (
    "variant",
    "strength",
    "seeds",
    "train_accuracy",
    "test_accuracy_mean",
    "test_accuracy_std",
    "test_accuracy_min",
    "test_accuracy_max",
    "gain_over_neither",
    "gain_stderr",
)


class NoisyResNet(eqx.Module):
    """An Euler ResNet of `L` two-layer blocks on `[0, T]` and a linear readout.

    `__call__(x)` is deterministic (eq. 14-17); `dropout(x, p, key)` drops hidden
    units of every block; `sde(x, eps, key)` solves `dy = v dt + eps dW` by Euler.
    """

    params: TwoLayerParams
    W_out: Float[Array, "k n"]
    b_out: Float[Array, " k"]
    T: float = eqx.field(static=True)
    sigma = staticmethod(jax.nn.relu)

    @property
    def num_blocks(self) -> int:
        return self.params.W1.shape[0]

    @property
    def dt(self) -> float:
        return self.T / self.num_blocks

    def _steps(self, y, velocity, keys):
        def step(y, inputs):
            block, key = inputs
            return y + self.dt * velocity(block, y, key), None

        return jax.lax.scan(step, y, (self.params, keys))[0]

    def __call__(self, x: Float[Array, " n"]) -> Float[Array, " k"]:
        keys = jnp.zeros((self.num_blocks, 2), jnp.uint32)
        y = self._steps(x, lambda p, y, _: two_layer_velocity(p, y, self.sigma), keys)
        return self.W_out @ y + self.b_out

    def dropout(self, x, p: Array, key) -> Float[Array, " k"]:
        """Inverted dropout of the hidden units `sigma(W1 y + b1)` of every block."""

        def velocity(block, y, k):
            h = self.sigma(block.W1 @ y + block.b1)
            keep = jr.bernoulli(jr.wrap_key_data(k), 1 - p, h.shape)
            return block.W2 @ jnp.where(keep, h / (1 - p), 0) + block.b2

        keys = jr.key_data(jr.split(key, self.num_blocks))
        return self.W_out @ self._steps(x, velocity, keys) + self.b_out

    def sde(self, x, eps: Array, key) -> Float[Array, " k"]:
        """Euler-Maruyama on `dy = v(y, t) dt + eps dW` over the blocks' grid."""
        n, dtype = x.shape[0], x.dtype
        ts = jnp.linspace(0.0, self.T, self.num_blocks + 1, dtype=dtype)
        t0, t1 = ts[0], ts[-1]  # times in the state's dtype, also under x64
        brownian = diffrax.VirtualBrownianTree(
            t0,
            t1,
            tol=self.dt / 2,  # the grid times are points of the tree
            shape=jax.ShapeDtypeStruct((n,), dtype),
            key=key,
        )
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(_BlockDrift(self.sigma, self.dt)),
            diffrax.ControlTerm(
                lambda t, y, args: eps * jnp.eye(n, dtype=dtype), brownian
            ),
        )
        solution = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            t0,
            t1,
            None,
            x,
            args=self.params,
            stepsize_controller=diffrax.StepTo(ts),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=self.num_blocks,
        )
        assert solution.ys is not None
        return self.W_out @ solution.ys[-1] + self.b_out


class _BlockDrift(eqx.Module):
    """The drift `v(y, t)` of block `k = round(t / dt)` (eq. 2); exact on the grid."""

    sigma: Callable[[Array], Array] = eqx.field(static=True)
    dt: float = eqx.field(static=True)

    def __call__(self, t, y, params):
        L = params.W1.shape[0]
        k = jnp.clip(jnp.round(t / self.dt).astype(jnp.int32), 0, L - 1)
        block = jtu.tree_map(lambda a: a[k], params)
        return two_layer_velocity(block, y, self.sigma)


def init_model(config: Config, n: int, classes: int, key) -> NoisyResNet:
    k_field, k_out = jr.split(key)
    params = TwoLayerParams.init(
        n, config.hidden, key=k_field, num_blocks=config.blocks, dtype=common.DTYPE
    )
    W_out = jr.normal(k_out, (classes, n), common.DTYPE) / math.sqrt(n)
    return NoisyResNet(params, W_out, jnp.zeros(classes, common.DTYPE), config.T)


class Regularized(eqx.Module):
    """`net` as `fit` trains it: `__call__(x, key=k)` runs `mode` (`'neither'`,
    `'dropout'` of rate `strength` or `'noise'` of size `strength`); without a key,
    the deterministic ResNet."""

    net: NoisyResNet
    mode: str = eqx.field(static=True)
    strength: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, " n"], *, key=None) -> Float[Array, " k"]:
        if key is None or self.mode == "neither":
            return self.net(x)
        forward = self.net.dropout if self.mode == "dropout" else self.net.sde
        return forward(x, jnp.asarray(self.strength, x.dtype), key)


def _variants(config: Config) -> list[tuple[str, float]]:
    return (
        [("neither", 0.0)]
        + [("dropout", p) for p in config.dropout_rates]
        + [("noise", eps) for eps in config.noise_levels]
    )


def plan(config: Config) -> Plan:
    """What `run` trains (for `--dry-run`): every variant, `num_seeds` times, full
    batch on `10 per_class` digits."""
    trainings = [
        Training(
            f"{mode} {strength:g}",
            functools.partial(_regularized, config, mode, strength),
            dict(
                steps=config.steps,
                batch_size=10 * config.per_class,
                learning_rate=config.learning_rate,
                task="classification",
                stochastic=mode != "neither",
            ),
            runs=config.num_seeds,
        )
        for mode, strength in _variants(config)
    ]
    return Plan(DIGITS._replace(n_train=10 * config.per_class), trainings)


def _regularized(config: Config, mode: str, strength: float) -> Regularized:
    return Regularized(init_model(config, 64, 10, jr.key(0)), mode, strength)


def run(config: Config, seed: int) -> common.Outcome:
    split = common.digits(seed)
    seeds = common.seeds_of(seed, config.num_seeds)
    subsets = [common.subsample(split, config.per_class, s) for s in seeds]
    rows, per_seed = [], {}
    for mode, strength in _variants(config):
        common.stderr(f"{NAME}: training {mode} ({strength:g}), {len(seeds)} seeds")
        test, train_acc = [], []
        for s, subset in zip(seeds, subsets, strict=True):
            model = Regularized(
                init_model(config, 64, 10, jr.key(1000 + s)), mode, strength
            )
            trained = common.train(
                model,
                subset,
                steps=config.steps,
                batch_size=len(subset.y_train),  # full batch
                learning_rate=config.learning_rate,
                seed=2000 + s,
                task="classification",
                stochastic=mode != "neither",
            )
            test.append(trained.test["accuracy"])
            train_acc.append(trained.train["accuracy"])
        test = np.asarray(test)
        per_seed[f"{mode} {strength:g}"] = test
        rows.append(_row(mode, strength, seeds, test, np.asarray(train_acc), per_seed))
    return common.Outcome(
        COLUMNS,
        rows,
        {
            "seeds": seeds,
            "n_train": len(subsets[0].y_train),
            "n_test": len(split.y_test),
        },
        _verdict(rows),
        {"test_accuracy_per_seed": per_seed},
    )


def _row(mode, strength, seeds, test, train_acc, per_seed) -> dict:
    spread = common.mean_and_spread(test)
    gain = test - per_seed["neither 0"]
    stderr = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0
    return {
        "variant": mode,
        "strength": strength,
        "seeds": len(seeds),
        "train_accuracy": float(np.mean(train_acc)),
        "test_accuracy_mean": spread["mean"],
        "test_accuracy_std": spread["std"],
        "test_accuracy_min": spread["min"],
        "test_accuracy_max": spread["max"],
        "gain_over_neither": float(gain.mean()),
        "gain_stderr": stderr,
    }


def _best(rows, mode: str) -> dict:
    return max(
        (r for r in rows if r["variant"] == mode), key=lambda r: r["gain_over_neither"]
    )


def _verdict(rows) -> common.Verdict:
    neither = rows[0]
    dropout, noise = _best(rows, "dropout"), _best(rows, "noise")

    def significant(r):
        return r["gain_over_neither"] > 2 * r["gain_stderr"] and r["seeds"] > 1

    def text(r):
        return (
            f"{r['gain_over_neither']:+.3f} +- {r['gain_stderr']:.3f} "
            f"({r['variant']} {r['strength']:g})"
        )

    sentence = (
        f"'neither' reaches test accuracy {neither['test_accuracy_mean']:.3f} "
        f"+- {neither['test_accuracy_std']:.3f} over {neither['seeds']} seeds; best "
        f"paired gains: dropout {text(dropout)}, noise {text(noise)}"
    )
    if significant(dropout) and significant(noise):
        supports: bool | None = True
    elif significant(dropout) and not significant(noise):
        supports = False
    else:
        supports = None  # dropout itself does not regularize here: no comparison
    return common.Verdict(
        supports,
        "supported if the best noise level and the best dropout rate both raise mean "
        "test accuracy over 'neither' by more than 2 standard errors of the paired "
        "(same seed) difference; not supported if only dropout does; inconclusive if "
        "dropout does not",
        sentence,
    )


def plot(record: dict, path) -> None:
    rows, per_seed = record["rows"], record["series"]["test_accuracy_per_seed"]
    fig, (ax, ax_gain) = common.figure(2, width=5.6, height=4.4)
    names = [f"{r['variant']} {r['strength']:g}" for r in rows]
    labels = [
        "neither"
        if r["variant"] == "neither"
        else f"dropout\np = {r['strength']:g}"
        if r["variant"] == "dropout"
        else f"SDE noise\neps = {r['strength']:g}"
        for r in rows
    ]
    colors = {"neither": "0.4", "dropout": "C0", "noise": "C1"}
    x = np.arange(len(rows))
    for i, (name, r) in enumerate(zip(names, rows, strict=True)):
        values = np.asarray(per_seed[name])
        jitter = np.linspace(-0.12, 0.12, len(values))
        color = colors[r["variant"]]
        ax.scatter(i + jitter, values, s=12, color=color, alpha=0.6)
        ax.errorbar(
            i + 0.25,
            r["test_accuracy_mean"],
            yerr=r["test_accuracy_std"],
            fmt="o",
            color=color,
            capsize=4,
        )
        if r["variant"] != "neither":
            ax_gain.errorbar(
                i,
                r["gain_over_neither"],
                yerr=2 * r["gain_stderr"],
                fmt="o",
                color=color,
                capsize=4,
            )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("training variant (all tested without noise or dropout)")
    ax.set_ylabel("test accuracy (deterministic forward pass)")
    ax.set_title(
        f"dots: seeds; bars: mean +- std ({rows[0]['seeds']} seeds)", fontsize=10
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax_gain.axhline(0.0, color="0.4", lw=1)
    ax_gain.set_xticks(x[1:], labels[1:], fontsize=8)
    ax_gain.set_xlim(ax.get_xlim())
    ax_gain.set_xlabel("training variant")
    ax_gain.set_ylabel("test accuracy gain over 'neither' (paired by seed)")
    ax_gain.set_title("mean gain +- 2 standard errors", fontsize=10)
    ax_gain.grid(True, axis="y", alpha=0.3)
    handles = [
        ax.scatter([], [], color=c, label=name)
        for name, c in (("neither", "0.4"), ("dropout", "C0"), ("SDE noise", "C1"))
    ]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    summary = record["summary"]
    fig.suptitle(
        f"Experiment 5: noise in the transport against dropout, digits with "
        f"{summary['n_train']} training examples"
    )
    common.save(fig, path)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:], name=NAME))
