"""Section 1: fixed-step Euler ResNets (eq. 10-17), four ways on the same work.

On `K` steps of the two-layer field `f(t, y, p_k) = W2_k tanh(W1_k y + b1_k) + b2_k`
(eq. 2) with per-block parameters `p_k`, `dt = 1/K`, state `n`, width `m`, a batch
of `B` states, float32:

- flowjax: `EulerResNet(TwoLayerField(tanh), p)` (a `lax.scan` over the blocks),
  vmapped over the batch;
- diffrax: `diffeqsolve(ODETerm, Euler(), 0, 1, dt0=1/K, ConstantStepSize(),
  max_steps=K)` on the same field, block `k = round(t K)` looked up at time `t`,
  the batch carried as one `(B, n)` state (vmapping `diffeqsolve` makes the
  gradient of the unbatched parameters one copy per sample);
- a Python loop of the same `K` steps, unrolled under `jit`, vmapped;
- the bare chain `Y <- Y + (Y W1_k^T) W2_k^T` under `lax.scan`: the matrix
  products alone, the practical limit;
- for forward+backward also flowjax's `EulerResNet(..., checkpoint=True)`, which
  recomputes each step in the backward pass as diffrax's default adjoint does.

FLOP count (stated, not measured): the two matrix products of a step cost
`2 B n m` multiply-adds each, so a forward pass is `4 B n m K` flops; the backward
pass costs two more of each product (input and weight cotangents), so forward plus
backward is `12 B n m K`. Biases, `tanh`, `dt` and the residual add (`O(B (n + m)
K)`) are not counted. GFLOP/s of every side uses this count.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from flowjax._resnet import EulerResNet
from flowjax._two_layer import TwoLayerField, TwoLayerParams

from ._harness import Row, TimingSettings, blocking, compile_jax, make_row, time_calls


SECTION = "1. Fixed-step Euler ResNet"
FIELD = TwoLayerField(jnp.tanh)
SIDES = {
    "flowjax": "EulerResNet (lax.scan)",
    "flowjax_checkpoint": "EulerResNet(checkpoint=True)",
    "diffrax": "diffrax.diffeqsolve(Euler, ConstantStepSize)",
    "loop": "Python loop, unrolled under jit",
    "chain": "bare matmul chain (lax.scan)",
}
# A target is an upper bound on flowjax time / other time.
TARGET_DIFFRAX_BATCH_1 = 0.9
TARGET_DIFFRAX = 1.0
TARGET_CHAIN = 1.25  # at least 80% of the chain's throughput


@dataclasses.dataclass(frozen=True)
class EulerConfig:
    """Batch `B`, state `n`, width `m`, steps `K`; `loop`: time the unrolled loop."""

    B: int
    n: int
    m: int
    K: int
    loop: bool = True

    @property
    def shapes(self) -> str:
        return f"B={self.B} n={self.n} m={self.m} K={self.K}"

    def flops(self, backward: bool) -> float:
        """`4 B n m K` forward, three times that with the backward pass."""
        forward = 4.0 * self.B * self.n * self.m * self.K
        return 3 * forward if backward else forward


FULL = (
    EulerConfig(1, 16, 64, 16),
    EulerConfig(1, 16, 64, 128, loop=False),
    EulerConfig(32, 16, 64, 16),
    EulerConfig(32, 16, 64, 128, loop=False),
    EulerConfig(256, 16, 64, 16),
    EulerConfig(256, 16, 64, 128, loop=False),
    EulerConfig(1, 64, 256, 16),
    EulerConfig(256, 64, 256, 128, loop=False),
)
TINY = (EulerConfig(2, 4, 8, 4),)


# The four implementations, each `(p, Y) -> Y_K` for a batch `Y: (B, n)`


def flowjax_resnet(p: TwoLayerParams, Y: jax.Array) -> jax.Array:
    """flowjax's scanned Euler ResNet on each state of the batch."""
    return jax.vmap(EulerResNet(FIELD, p))(Y)


def flowjax_resnet_checkpointed(p: TwoLayerParams, Y: jax.Array) -> jax.Array:
    """The same ResNet with each step under `jax.checkpoint` (recomputed in the
    backward pass instead of stored)."""
    return jax.vmap(EulerResNet(FIELD, p, checkpoint=True))(Y)


def diffrax_euler(p: TwoLayerParams, Y: jax.Array) -> jax.Array:
    """`diffrax.diffeqsolve` with `Euler` and `K` constant steps on `[0, 1]`."""
    K = p.W1.shape[0]

    def field(t, Y, p):
        k = jnp.clip(jnp.round(t * K).astype(jnp.int32), 0, K - 1)
        p_k = jax.tree.map(lambda a: a[k], p)
        return jax.vmap(lambda y: FIELD(t, y, p_k))(Y)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Euler(),
        0.0,
        1.0,
        1.0 / K,
        Y,
        args=p,
        stepsize_controller=diffrax.ConstantStepSize(),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=K,
    )
    assert sol.ys is not None
    return sol.ys[-1]


def unrolled_loop(p: TwoLayerParams, Y: jax.Array) -> jax.Array:
    """The `K` Euler steps as a Python loop (unrolled when traced)."""
    K = p.W1.shape[0]
    ts = np.linspace(0.0, 1.0, K + 1)

    def one(y):
        for k in range(K):
            p_k = jax.tree.map(lambda a, k=k: a[k], p)
            y = y + jnp.asarray(ts[k + 1] - ts[k], y.dtype) * FIELD(ts[k], y, p_k)
        return y

    return jax.vmap(one)(Y)


def matmul_chain(p: TwoLayerParams, Y: jax.Array) -> jax.Array:
    """`Y <- Y + (Y W1_k^T) W2_k^T` for `k = 0..K-1`: the matrix products alone."""

    def step(Y, W):
        W1, W2 = W
        return Y + (Y @ W1.T) @ W2.T, None

    return jax.lax.scan(step, Y, (p.W1, p.W2))[0]


IMPLEMENTATIONS: dict[str, Callable[[TwoLayerParams, jax.Array], jax.Array]] = {
    "flowjax": flowjax_resnet,
    "diffrax": diffrax_euler,
    "loop": unrolled_loop,
    "chain": matmul_chain,
    "flowjax_checkpoint": flowjax_resnet_checkpointed,  # forward+backward only
}


def gradient_of(
    forward: Callable[[TwoLayerParams, jax.Array], jax.Array],
) -> Callable[[TwoLayerParams, jax.Array], TwoLayerParams]:
    """The gradient of `sum(forward(p, Y)^2) / 2` with respect to `p`."""
    return jax.grad(lambda p, Y: 0.5 * jnp.sum(forward(p, Y) ** 2))


def problem(cfg: EulerConfig, seed: int = 0) -> tuple[TwoLayerParams, jax.Array]:
    """Random float32 block parameters `(K, ...)` and a batch `Y: (B, n)`."""
    kp, ky = jr.split(jr.key(seed))
    p = TwoLayerParams.init(
        cfg.n, cfg.m, key=kp, num_blocks=cfg.K, dtype=jnp.float32, scale=1.0
    )
    return p, jr.normal(ky, (cfg.B, cfg.n), jnp.float32)


# Running a configuration


def _max_abs(a: Any, b: Any) -> float:
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def _measure_mode(
    cfg: EulerConfig, backward: bool, timing: TimingSettings
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """Compile and time every implementation of `cfg` in one mode.

    Returns the measurements, the compile seconds and the outputs by name.
    """
    p, Y = problem(cfg)
    names = [
        name
        for name in IMPLEMENTATIONS
        if (cfg.loop or name != "loop") and (backward or name != "flowjax_checkpoint")
    ]
    compiled, compile_s, outputs = {}, {}, {}
    for name in names:
        fn = IMPLEMENTATIONS[name]
        fn = gradient_of(fn) if backward else fn
        compiled[name], compile_s[name] = compile_jax(fn, p, Y)
        outputs[name] = jax.block_until_ready(compiled[name](p, Y))
    times = time_calls([blocking(compiled[n], p, Y) for n in names], timing)
    return dict(zip(names, times, strict=True)), compile_s, outputs


def _gflops(cfg: EulerConfig, backward: bool, seconds: float) -> float:
    return cfg.flops(backward) / seconds / 1e9


def _pairs(backward: bool) -> list[tuple[str, str]]:
    """`(ours, theirs)` names of the rows of one mode."""
    pairs = [("flowjax", "diffrax"), ("flowjax", "loop"), ("flowjax", "chain")]
    if backward:
        pairs.append(("flowjax_checkpoint", "diffrax"))
    return pairs


def _target(cfg: EulerConfig, theirs: str) -> float | None:
    if theirs == "chain":
        return TARGET_CHAIN
    if theirs == "diffrax":
        return TARGET_DIFFRAX_BATCH_1 if cfg.B == 1 else TARGET_DIFFRAX
    return None


def _rows_for_mode(
    cfg: EulerConfig, backward: bool, timing: TimingSettings
) -> list[Row]:
    times, compile_s, outputs = _measure_mode(cfg, backward, timing)
    benchmark = "forward+backward" if backward else "forward"
    rows = []
    for ours, theirs in _pairs(backward):
        if theirs not in times:
            continue
        gf_ours = _gflops(cfg, backward, times[ours].median_s)
        gf_other = _gflops(cfg, backward, times[theirs].median_s)
        extra: dict[str, Any] = {
            "flops": cfg.flops(backward),
            "gflops_flowjax": gf_ours,
            "gflops_other": gf_other,
        }
        notes = f"GFLOP/s {gf_ours:.3g} vs {gf_other:.3g}"
        if theirs == "chain":
            extra["throughput_fraction"] = gf_ours / gf_other
            notes += f" ({gf_ours / gf_other:.0%} of the chain)"
        else:
            diff = _max_abs(outputs[ours], outputs[theirs])
            extra["max_abs_diff"] = diff
            notes += f"; max abs diff {diff:.1e}"
        rows.append(
            make_row(
                SECTION,
                benchmark,
                (SIDES[ours], SIDES[theirs]),
                cfg.shapes,
                (times[ours], times[theirs]),
                target=_target(cfg, theirs),
                compile_s=(compile_s[ours], compile_s[theirs]),
                notes=notes,
                extra=extra,
            )
        )
    return rows


def run(configs: tuple[EulerConfig, ...], timing: TimingSettings) -> list[Row]:
    """All rows of section 1: every configuration, forward and forward+backward."""
    rows = []
    for cfg in configs:
        for backward in (False, True):
            rows.extend(_rows_for_mode(cfg, backward, timing))
    return rows
