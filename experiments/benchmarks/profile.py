"""Timing the pieces behind the missed targets of the benchmark suite.

    python -m experiments.benchmarks.profile [--out DIR] [--threads N]

Writes `profile.md` (default into `experiments/benchmarks/results/`). Each table
times variants of one computation, round-robin in one process, so the rows can be
subtracted from each other:

1. Euler ResNet against the bare matrix chain: what the biases, `tanh` and the
   per-sample (vmapped) matrix-vector form cost, and what unrolling gains.
2. Refined ReLU `linear="whole"` against the plain MLP: the activation stages and
   the `unroll` of their scan.
3. `refine` against the SciPy pipeline: the decompositions on each side.
4. Thread pools on a shared machine: 1 thread against the libraries' defaults.
5. The flow model: vmapped per-sample solves against one solve of the batch.
"""

import argparse
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.linalg

from flowjax._activation_blocks import ActivationStage
from flowjax._activations import sigma_s_inverse
from flowjax._fields import NUM_STAGES, stage_field
from flowjax._linalg import _layer_svd_core, _skew_log_impl
from flowjax._refine import RefinedNet, refine
from flowjax._resnet import Chain

from . import adaptive
from ._harness import (
    Measurement,
    TimingSettings,
    blocking,
    compile_jax,
    limited_threads,
    machine,
    time_calls,
)
from .euler import EulerConfig, flowjax_resnet, matmul_chain, problem
from .refining import (
    _numpy_layers,
    refine_arrays,
    relu_layer,
    relu_mlp,
    scipy_pipeline,
)


HERE = Path(__file__).resolve().parent
TIMING = TimingSettings(warmup=2, min_runs=7, max_runs=100, budget_s=1.5)
SLOW = TimingSettings(warmup=1, min_runs=3, max_runs=5, budget_s=5.0)


def _table(title: str, names: Sequence[str], times: Sequence[Measurement]) -> str:
    base = times[0].median_s
    lines = [
        f"#### {title}\n",
        "| variant | median ms | / first row |\n|---|---:|---:|",
    ]
    for name, t in zip(names, times, strict=True):
        lines.append(f"| {name} | {t.median_s * 1e3:.3g} | {t.median_s / base:.2f} |")
    return "\n".join(lines) + f"\n\n({times[0].runs} runs each)\n"


# 1. Euler ResNet pieces


def _scan_steps(step: Callable[..., Any], unroll: int = 1):
    def fn(p, Y):
        K = p.W1.shape[0]
        dt = jnp.asarray(1.0 / K, Y.dtype)
        return jax.lax.scan(lambda Y, q: (step(Y, q, dt), None), Y, p, unroll=unroll)[0]

    return fn


def _bias_only(Y, q, dt):
    return Y + dt * ((Y @ q.W1.T + q.b1) @ q.W2.T + q.b2)


def _full_step(Y, q, dt):
    return Y + dt * (jnp.tanh(Y @ q.W1.T + q.b1) @ q.W2.T + q.b2)


def _vmapped(row_form: bool):
    """The field per sample under `vmap`: `W2 tanh(W1 y + b1) + b2` (as
    `flowjax.two_layer_velocity` writes it) or `tanh(y W1^T + b1) W2^T + b2`."""

    def velocity(q, y):
        if row_form:
            return jnp.tanh(y @ q.W1.T + q.b1) @ q.W2.T + q.b2
        return q.W2 @ jnp.tanh(q.W1 @ y + q.b1) + q.b2

    def fn(p, Y):
        dt = jnp.asarray(1.0 / p.W1.shape[0], Y.dtype)

        def one(y):
            return jax.lax.scan(lambda y, q: (y + dt * velocity(q, y), None), y, p)[0]

        return jax.vmap(one)(Y)

    return fn


def euler_pieces(cfg: EulerConfig) -> str:
    p, Y = problem(cfg)
    variants: dict[str, Callable[..., Any]] = {
        "bare matmul chain (lax.scan)": matmul_chain,
        "+ biases and dt": _scan_steps(_bias_only),
        "+ tanh (the whole field, batched scan)": _scan_steps(_full_step),
        "flowjax EulerResNet (vmapped)": flowjax_resnet,
        "vmapped scan, W y form (as flowjax)": _vmapped(row_form=False),
        "vmapped scan, row form y W^T": _vmapped(row_form=True),
        "batched scan, unroll=4": _scan_steps(_full_step, unroll=4),
    }
    compiled = [compile_jax(fn, p, Y)[0] for fn in variants.values()]
    times = time_calls([blocking(c, p, Y) for c in compiled], TIMING)
    return _table(f"Euler ResNet pieces, {cfg.shapes}, forward", list(variants), times)


# 2. Refined forward pieces


def _with_unroll(refined: RefinedNet, unroll: int) -> RefinedNet:
    stages = tuple(
        ActivationStage(s.blocks, unroll=unroll)
        if isinstance(s, ActivationStage)
        else s
        for s in refined.chain.stages
    )
    return eqx.tree_at(lambda r: r.chain, refined, Chain(stages))


def _forward(model: Any, X: jax.Array) -> Callable[[], Any]:
    arrays, static = eqx.partition(model, eqx.is_array)

    def fn(arrays, X):
        return jax.vmap(eqx.combine(arrays, static))(X)

    return blocking(compile_jax(fn, arrays, X)[0], arrays, X)


def refined_pieces(width: int, K: int, B: int = 256, d: int = 64) -> str:
    mlp = relu_mlp(d, width)
    X = jr.normal(jr.key(1), (B, d), jnp.float32)
    refined = refine(mlp, K, linear="whole")
    variants: dict[str, Any] = {"plain MLP": mlp}
    for unroll in (1, 4, 8, K):
        variants[f'refine(mlp, {K}, "whole"), unroll={unroll}'] = _with_unroll(
            refined, unroll
        )
    times = time_calls([_forward(m, X) for m in variants.values()], TIMING)
    title = f"Refined forward, MLP {d}-{width}-{width}-{d} ReLU, B={B}, K={K}"
    return _table(title + " (default unroll is 4)", list(variants), times)


# 3. refine against SciPy, piece by piece


def _scipy_logm_parts(U: np.ndarray) -> tuple[Callable[[], Any], Callable[[], Any]]:
    from scipy.linalg._matfuncs_inv_ssq import _logm  # the logarithm alone

    def full():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return scipy.linalg.logm(U)

    return full, lambda: _logm(U)


def refine_pieces(width: int) -> str:
    net = relu_layer(width)
    arrays, static = eqx.partition(net, eqx.is_array)
    n = width + 1
    W = _numpy_layers(net)[0][0]
    U = np.asarray(_layer_svd_core(W, n)[0])
    logm_full, logm_only = _scipy_logm_parts(U.astype(np.float64))
    refine_c, _ = compile_jax(refine_arrays(8, static), arrays)
    layers = _numpy_layers(net)
    Wp = np.zeros((n, n), np.float32)
    Wp[:width, :width] = np.asarray(W)
    variants: dict[str, Callable[[], Any]] = {
        f'flowjax refine(net, 8, "flow"), {len(layers)} layer(s)': blocking(
            refine_c, arrays
        ),
        "flowjax layer_svd (one layer)": blocking(_layer_svd_core, W, n),
        "flowjax skew_log (one rotation)": blocking(_skew_log_impl, jnp.asarray(U)),
        "jnp.linalg.svd (n x n)": blocking(jax.jit(jnp.linalg.svd), jnp.asarray(Wp)),
        "jnp.linalg.eigh (n x n)": blocking(
            jax.jit(jnp.linalg.eigh), jnp.asarray(Wp + Wp.T)
        ),
        f"SciPy pipeline, {len(layers)} layer(s)": lambda: scipy_pipeline(layers, n),
        "scipy.linalg.svd (n x n)": lambda: scipy.linalg.svd(Wp),
        "scipy.linalg.logm (one rotation)": logm_full,
        "  of which the logarithm alone (no expm error estimate)": logm_only,
    }
    times = time_calls(list(variants.values()), SLOW)
    return _table(f"refine pieces, width {width} (n = {n})", list(variants), times)


# 4. Thread pools


def thread_pieces(width: int) -> str:
    from threadpoolctl import threadpool_limits

    net = relu_layer(width)
    arrays, static = eqx.partition(net, eqx.is_array)
    refine_c, _ = compile_jax(refine_arrays(8, static), arrays)
    layers = _numpy_layers(net)
    names, times = [], []
    for label, limit in (("1 thread", 1), ("library default", None)):
        with threadpool_limits(limits=limit):
            t = time_calls(
                [blocking(refine_c, arrays), lambda: scipy_pipeline(layers, width + 1)],
                SLOW,
            )
        names += [f"flowjax refine, {label}", f"SciPy pipeline, {label}"]
        times += t
    return _table(f"BLAS/LAPACK threads, width {width}", names, times)


# 5. The flow model, per sample or as one batch


def _joint_flow_model(static: Any, s_cut: float):
    """The flow model's stages solved once for the whole batch `(B, n)`, each
    stage field vmapped inside the vector field (as torchdiffeq solves it); the
    activation stage ends at `s_cut` and is closed exactly (eq. 42)."""

    def fn(arrays, X):
        m = eqx.combine(arrays, static)
        Y = jax.vmap(m.embed)(X)
        for layer in m.flow.layers:
            for stage in range(NUM_STAGES):
                if stage == NUM_STAGES - 1 and layer.sigma.name == "identity":
                    continue
                f, args = stage_field(stage, layer, m.time_scaling)
                end = 1.0 if stage < NUM_STAGES - 1 else s_cut
                sol = m.integrator.solve(_batched(f), Y, 0.0, end, args)
                assert sol.ys is not None
                Y = sol.ys[-1]
                if stage == NUM_STAGES - 1:  # close exactly (eq. 42)
                    tau = m.time_scaling.tau(jnp.asarray(end, Y.dtype))
                    Y = layer.sigma(sigma_s_inverse(layer.sigma, Y, tau))
        return jax.vmap(m.readout)(Y)

    return fn


def _batched(f: Callable[..., Any]) -> Callable[..., Any]:
    return lambda s, Y, args: jax.vmap(lambda y: f(s, y, args))(Y)


def flow_model_pieces() -> str:
    cfg = adaptive.FULL
    mlp, X = adaptive.mlp_problem(cfg)
    model = adaptive.flowjax_flow_model("Tsit5", cfg, mlp)
    s_cut = model.time_scaling.one_minus_tau_inverse(model.activation_cut)
    fn, arrays = adaptive.model_call(model)
    static = eqx.partition(model, eqx.is_array)[1]
    per_sample = compile_jax(fn, arrays, X)[0]
    joint = compile_jax(_joint_flow_model(static, s_cut), arrays, X)[0]
    error = float(jnp.max(jnp.abs(per_sample(arrays, X)[0] - joint(arrays, X))))
    times = time_calls(
        [blocking(per_sample, arrays, X), blocking(joint, arrays, X)], SLOW
    )
    names = [
        "flowjax flow_model, vmapped over the batch (per-sample steps)",
        "the same stages, one solve of the (B, n) batch",
    ]
    title = (
        f"Flow model of a ReLU MLP {cfg.mlp_in}-{cfg.mlp_width}-{cfg.mlp_in}, "
        f"B={cfg.B}, Tsit5, rtol={cfg.rtol:g} (outputs differ by {error:.1e})"
    )
    return _table(title, names, times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.profile")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    meta = machine()
    parts = [thread_pieces(128)]
    with limited_threads(args.threads):
        parts += [
            euler_pieces(EulerConfig(256, 16, 64, 16)),
            euler_pieces(EulerConfig(1, 64, 256, 16)),
            euler_pieces(EulerConfig(1, 16, 64, 128)),
            refined_pieces(64, 32),
            refined_pieces(512, 32),
            refine_pieces(512),
            flow_model_pieces(),
        ]
    head = (
        f"Profile run {meta['date']}: {meta['cpu']}, {meta['cores']} cores, load "
        f"average {meta['load_average_start'][0]} at the start; threads "
        f"{args.threads}.\n"
    )
    text = head + "\n" + "\n".join(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
