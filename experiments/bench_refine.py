"""Benchmark `flowjax.refine` on this machine (issue 3, "Must show" item 6).

Prints, in one run:

1. compile time and forward time of refined ReLU MLPs at `num_steps` 8, 64 and
   1024, for `linear="whole"` and `linear="flow"`, with the ratios 1024 / 8 (target
   for compile: <= 1.5) and 1024 / 64;
2. storage bytes of tied and untied refinements (`linear="flow"`);
3. forward time of a refined ReLU MLP (`linear="whole"`, 32 steps) against the plain
   MLP (target: <= 1.3).

Forward times are medians over `--repeats` runs of the compiled, vmapped function on
a batch, after a warm-up, with plain and refined runs interleaved so that both see
the same machine load. Run with `python experiments/bench_refine.py`.
"""

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from flowjax._refine import refine


def _batched(model: Any, xs: jax.Array) -> jax.Array:
    return jax.vmap(model)(xs)


def compile_seconds(model: Any, xs: jax.Array) -> tuple[float, Callable]:
    """Seconds to lower and compile `vmap(model)` on `xs` (a fresh `eqx.filter_jit`)."""
    start = time.perf_counter()
    compiled = eqx.filter_jit(_batched).lower(model, xs).compile()
    return time.perf_counter() - start, compiled


def best_compile_seconds(models: list[Any], xs: jax.Array, trials: int = 3) -> list:
    """Best of `trials` compile times of each model, interleaved; each trial uses
    a new batch size so that no compilation comes from a cache."""
    best = [np.inf] * len(models)
    for trial in range(trials):
        batch = xs[: xs.shape[0] - 1 - trial]
        for i, model in enumerate(models):
            best[i] = min(best[i], compile_seconds(model, batch)[0])
    return best


def forward_seconds(runs: dict[str, Callable[[], Any]], repeats: int) -> dict:
    """Median seconds of each run, interleaved, after two warm-up calls each."""
    for run in runs.values():
        for _ in range(2):
            jax.block_until_ready(run())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def shape_bytes(tree: Any) -> int:
    """Bytes of the array leaves of `tree` (arrays or `ShapeDtypeStruct`s)."""
    leaves = jax.tree.leaves(tree)
    sized = [x for x in leaves if hasattr(x, "shape") and hasattr(x, "dtype")]
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in sized)


def make_mlp(widths: tuple[int, ...], seed: int = 0) -> eqx.nn.MLP:
    """A ReLU MLP with input size, hidden width, depth and output size from
    `widths = (d_in, width, ..., width, d_out)`."""
    d_in, *hidden, d_out = widths
    return eqx.nn.MLP(d_in, d_out, hidden[0], len(hidden), key=jax.random.key(seed))


def _inputs(mlp: eqx.nn.MLP, batch: int) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, mlp.in_size))


def _arch(widths: tuple[int, ...]) -> str:
    return "-".join(map(str, widths))


def bench_num_steps(widths: tuple[int, ...], batch: int, repeats: int) -> None:
    mlp = make_mlp(widths)
    xs = _inputs(mlp, batch)
    print(f"\n1. compile and forward time against num_steps ({_arch(widths)} ReLU MLP,")
    print(f"   batch {batch}, float32, vmap + jit)")
    print(
        f"   {'linear':<6} {'K':>5} {'depth':>6} {'compile s':>10} {'forward ms':>11}"
    )
    compile_seconds(refine(mlp, 2), xs)  # warm up the compiler
    steps = (8, 64, 1024)
    for linear in ("whole", "flow"):
        refined = [refine(mlp, K, linear=linear) for K in steps]
        compile_times = best_compile_seconds(refined, xs)
        forward_times = []
        for K, model, seconds in zip(steps, refined, compile_times, strict=True):
            compiled = compile_seconds(model, xs)[1]
            run = {"r": lambda c=compiled, m=model: c(m, xs)}
            forward_times.append(forward_seconds(run, 5)["r"])
            print(
                f"   {linear:<6} {K:>5} {model.depth:>6} {seconds:>10.3f} "
                f"{1e3 * forward_times[-1]:>11.3f}"
            )
        compile_ratio = compile_times[2] / compile_times[0]
        print(
            f"   {linear:<6} ratio 1024/8: compile {compile_ratio:.2f} (target <= "
            f"1.5), forward {forward_times[2] / forward_times[0]:.1f}; ratio "
            f"1024/64: compile {compile_times[2] / compile_times[1]:.2f}"
        )
    print(
        "   (a 'whole' ReLU stage of K <= 32 blocks compiles without a loop, see\n"
        "    flowjax._activation_blocks.LEAKY_RELU_UNROLL; from K = 33 on the\n"
        "    program is one loop whose size does not depend on K)"
    )


def bench_storage(widths: tuple[int, ...]) -> None:
    mlp = make_mlp(widths)
    print(f"\n2. storage bytes, linear='flow' ({_arch(widths)} ReLU MLP, float32)")
    print(f"   {'K':>5} {'tied':>12} {'untied':>14} {'untied/tied':>12}")
    for K in (8, 1024):
        # Shapes only (the untied net at K = 1024 would take hundreds of MB).
        tied, untied = (
            eqx.filter_eval_shape(
                lambda m, K=K, tied=tied: refine(m, K, linear="flow", tied=tied), mlp
            )
            for tied in (True, False)
        )
        t, u = shape_bytes(tied), shape_bytes(untied)
        print(f"   {K:>5} {t:>12,} {u:>14,} {u / t:>12.1f}")
    print(f"   (mlp itself: {shape_bytes(mlp):,} bytes)")


def bench_forward(widths: tuple[int, ...], batch: int, repeats: int) -> float:
    mlp = make_mlp(widths)
    xs = _inputs(mlp, batch)
    refined = refine(mlp, 32)
    _, plain_fn = compile_seconds(mlp, xs)
    _, refined_fn = compile_seconds(refined, xs)
    out_plain, out_refined = plain_fn(mlp, xs), refined_fn(refined, xs)
    # Equal op by op (tests/test_refine.py); compiled, XLA may order the sums of a
    # product differently depending on what it fuses with, so allow rounding.
    deviation = float(jnp.max(jnp.abs(out_plain - out_refined)))
    scale = max(1.0, float(jnp.max(jnp.abs(out_plain))))
    assert deviation <= 1e-5 * scale, f"refined != plain: {deviation:.2e}"
    times = forward_seconds(
        {
            "plain": lambda: plain_fn(mlp, xs),
            "refined": lambda: refined_fn(refined, xs),
        },
        repeats,
    )
    ratio = times["refined"] / times["plain"]
    print(
        f"   {_arch(widths):<18} {batch:>6} {refined.depth:>6} "
        f"{1e3 * times['plain']:>9.3f} {1e3 * times['refined']:>11.3f} {ratio:>7.2f}"
        f"   max |diff| {deviation:.1e}"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"flowjax.refine benchmark: jax {jax.__version__}, {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
        f"{platform.machine()}, load average {load:.1f}"
    )
    bench_num_steps((32, 128, 128, 2), args.batch, args.repeats)
    bench_storage((32, 128, 128, 2))
    print("\n3. forward time, refined ReLU MLP (linear='whole', 32 steps) vs plain")
    print(
        f"   {'MLP':<18} {'batch':>6} {'depth':>6} {'plain ms':>9} "
        f"{'refined ms':>11} {'ratio':>7}  (target <= 1.3)"
    )
    for widths in ((32, 128, 128, 2), (16, 16, 16, 1), (784, 512, 512, 10)):
        bench_forward(widths, args.batch, args.repeats)


if __name__ == "__main__":
    main()
