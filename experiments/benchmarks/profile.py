"""Timing the pieces behind the missed targets of the benchmark suite.

    python -m experiments.benchmarks.profile [--out DIR] [--threads N]

Writes `profile.md` (default into `experiments/benchmarks/results/`). Each table
times variants of one computation, round-robin in one process, so the rows can be
subtracted from each other:

1. Euler ResNet against the bare matrix chain: what the biases, `tanh` and the
   scan's per-step overhead cost, and what unrolling the scan gains.
2. Refined ReLU `linear="whole"` against the plain MLP: the activation stages and
   the `unroll` of their scan.
3. `refine` against the SciPy pipeline: the decompositions on each side.
4. Thread pools on a shared machine: 1 thread against the libraries' defaults.
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
from flowjax._linalg import _layer_svd_core, _skew_log_impl
from flowjax._refine import RefinedNet, refine
from flowjax._resnet import Chain

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
    relu_mlp,
    scipy_pipeline,
    square_mlp,
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


def euler_pieces(cfg: EulerConfig) -> str:
    p, Y = problem(cfg)
    variants: dict[str, Callable[..., Any]] = {
        "bare matmul chain (lax.scan)": matmul_chain,
        "+ biases and dt": _scan_steps(_bias_only),
        "+ tanh (the whole field, batched scan)": _scan_steps(_full_step),
        "flowjax EulerResNet (vmapped)": flowjax_resnet,
        "batched scan, unroll=4": _scan_steps(_full_step, unroll=4),
        "batched scan, unroll=16": _scan_steps(_full_step, unroll=16),
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
    mlp = square_mlp(width)
    arrays, static = eqx.partition(mlp, eqx.is_array)
    n = width + 1
    W = mlp.layers[0].weight
    U = np.asarray(_layer_svd_core(W, n)[0])
    logm_full, logm_only = _scipy_logm_parts(U.astype(np.float64))
    refine_c, _ = compile_jax(refine_arrays(8, static), arrays)
    layers = _numpy_layers(mlp)
    Wp = np.zeros((n, n), np.float32)
    Wp[:width, :width] = np.asarray(W)
    variants: dict[str, Callable[[], Any]] = {
        f'flowjax refine(mlp, 8, "flow"), {len(layers)} layers': blocking(
            refine_c, arrays
        ),
        "flowjax layer_svd (one layer)": blocking(_layer_svd_core, W, n),
        "flowjax skew_log (one rotation)": blocking(_skew_log_impl, jnp.asarray(U)),
        "jnp.linalg.svd (n x n)": blocking(jax.jit(jnp.linalg.svd), jnp.asarray(Wp)),
        "jnp.linalg.eigh (n x n)": blocking(
            jax.jit(jnp.linalg.eigh), jnp.asarray(Wp + Wp.T)
        ),
        f"SciPy pipeline, {len(layers)} layers": lambda: scipy_pipeline(layers, n),
        "scipy.linalg.svd (n x n)": lambda: scipy.linalg.svd(Wp),
        "scipy.linalg.logm (one rotation)": logm_full,
        "  of which the logarithm alone (no expm error estimate)": logm_only,
    }
    times = time_calls(list(variants.values()), SLOW)
    return _table(f"refine pieces, width {width} (n = {n})", list(variants), times)


# 4. Thread pools


def thread_pieces(width: int) -> str:
    from threadpoolctl import threadpool_limits

    mlp = square_mlp(width)
    arrays, static = eqx.partition(mlp, eqx.is_array)
    refine_c, _ = compile_jax(refine_arrays(8, static), arrays)
    layers = _numpy_layers(mlp)
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
