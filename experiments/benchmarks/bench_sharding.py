"""Sharded against one-device throughput: training step, refined-net evaluation,
batched refinement; and the bfloat16 deviation of refined ReLU nets.

    python -m experiments.benchmarks.bench_sharding            # 8 simulated devices
    python -m experiments.benchmarks.bench_sharding --tiny     # seconds
    python -m experiments.benchmarks.bench_sharding --real     # the visible devices

On a CPU the devices are simulated (`--xla_force_host_platform_device_count`): the
8 "devices" share the machine's cores, so the figures measure the correctness and
the overhead of the sharded programs, not a speed-up. The benchmark re-runs itself
in a child process with the device count set before JAX starts, times a 1-device
mesh and an N-device mesh in the same process, round-robin (`_harness.time_calls`),
and writes `sharding.json` and `sharding.md` into `--out`
(default `experiments/benchmarks/results/sharding`).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flowjax._classifier import FlowNet
from flowjax._refine import LinearOption, refine
from flowjax._sharding import (
    batch_axes,
    cast_tree,
    data_parallel,
    evaluate_sharded,
    make_mesh,
    refine_many,
)
from flowjax._training import _Data, _make_step, _Objective

from ._harness import TimingSettings, blocking, machine, time_calls


HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sharding"
LINEAR: tuple[LinearOption, ...] = ("whole", "flow")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes: a `FlowNet` (state `n`, `hidden`, `blocks`) trained on batches of
    `train_batch`; ReLU MLPs `d -> width (x depth) -> d_out` refined with `K`
    steps, evaluated on `eval_batch` inputs; a stack of `stack` MLPs of width
    `stack_width` (one hidden layer) refined at once; the bfloat16 deviation at
    each of `bf16_steps`."""

    name: str
    n: int
    hidden: int
    blocks: int
    train_batch: int
    d: int
    width: int
    depth: int
    d_out: int
    K: int
    eval_batch: int
    stack: int
    stack_width: int
    bf16_steps: tuple[int, ...]
    timing: TimingSettings
    slow_timing: TimingSettings


FULL = Config(
    "full",
    n=16,
    hidden=64,
    blocks=8,
    train_batch=1024,
    d=16,
    width=64,
    depth=2,
    d_out=4,
    K=8,
    eval_batch=8192,
    stack=16,
    stack_width=32,
    bf16_steps=(1, 4, 16, 64),
    timing=TimingSettings(warmup=2, min_runs=5, max_runs=30, budget_s=1.0),
    slow_timing=TimingSettings(warmup=1, min_runs=3, max_runs=3, budget_s=1.0),
)
TINY = Config(
    "tiny",
    n=4,
    hidden=8,
    blocks=2,
    train_batch=64,
    d=3,
    width=8,
    depth=1,
    d_out=2,
    K=2,
    eval_batch=256,
    stack=8,
    stack_width=8,
    bf16_steps=(1, 4),
    timing=TimingSettings(warmup=1, min_runs=3, max_runs=3, budget_s=0.05),
    slow_timing=TimingSettings(warmup=1, min_runs=3, max_runs=3, budget_s=0.05),
)


# Workloads


def _relu_mlp(cfg: Config, key) -> eqx.nn.MLP:
    return eqx.nn.MLP(
        cfg.d,
        cfg.d_out,
        cfg.width,
        cfg.depth,
        activation=jax.nn.relu,
        key=key,
        dtype=jnp.float32,
    )


def _training_step(cfg: Config, mesh) -> Callable[[], Any]:
    """A blocking call of one jitted data-parallel step of `fit` on `mesh`."""
    net = FlowNet.init(
        cfg.n,
        2,
        n=cfg.n,
        hidden=cfg.hidden,
        num_blocks=cfg.blocks,
        key=jr.key(0),
        dtype=jnp.float32,
    )
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4 * cfg.train_batch, cfg.n)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int32)
    optimizer = optax.adam(1e-3)
    params, static = eqx.partition(net, net.trainable_spec())
    layout = data_parallel(mesh, cfg.train_batch)
    params, opt_state = layout.place_state((params, optimizer.init(params)))
    data = layout.replicate(_Data(jnp.asarray(X), jnp.asarray(y)))
    perm = layout.replicate(jnp.arange(X.shape[0]))
    objective = _Objective("classification", 0.0, 0.0)
    step = _make_step(static, optimizer, objective, layout)
    return blocking(step, params, opt_state, data, perm, 0, cfg.train_batch)


def _sharded_inputs(xs: jax.Array, mesh) -> jax.Array:
    return jax.device_put(xs, NamedSharding(mesh, P(batch_axes(mesh))))


def _evaluation(model, xs: jax.Array, mesh) -> Callable[[], Any]:
    """A blocking call of `evaluate_sharded` on inputs already split over `mesh`."""
    xs = _sharded_inputs(xs, mesh)
    return lambda: jax.block_until_ready(evaluate_sharded(model, xs, mesh=mesh))


def _refined(mlp: eqx.nn.MLP, K: int, linear: LinearOption) -> Any:
    """`refine(mlp, K, linear=linear)`, jitted (faster than eager)."""
    return eqx.filter_jit(lambda m: refine(m, K, linear=linear))(mlp)


def _bf16_deviation(cfg: Config) -> list[dict[str, Any]]:
    """`max |f_bf16 - f_f32| / max |f_f32|` of each net (refined or plain) against
    its own float32 forward, on `eval_batch` inputs; and, for comparison, the
    float32 refinement error `max |f_refined - f_plain| / max |f_plain|`."""
    mlp = _relu_mlp(cfg, jr.key(1))
    xs = jr.normal(jr.key(2), (cfg.eval_batch, cfg.d), jnp.float32)
    apply = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    plain32 = apply(mlp, xs)
    scale = float(jnp.max(jnp.abs(plain32)))

    def relative(model, reference):
        out = apply(cast_tree(model, jnp.bfloat16), xs.astype(jnp.bfloat16))
        gap = jnp.max(jnp.abs(out.astype(jnp.float32) - reference))
        return float(gap / jnp.max(jnp.abs(reference)))

    rows = [{"model": "plain MLP", "K": None, "bf16_deviation": relative(mlp, plain32)}]
    for linear in LINEAR:
        for K in cfg.bf16_steps:
            refined = _refined(mlp, K, linear)
            out32 = apply(refined, xs)
            rows.append(
                {
                    "model": f'refine(linear="{linear}")',
                    "K": K,
                    "bf16_deviation": relative(refined, out32),
                    "f32_refinement_error": float(jnp.max(jnp.abs(out32 - plain32)))
                    / scale,
                }
            )
    return rows


def _throughput(
    name: str,
    items: int,
    unit: str,
    calls: Sequence[Callable[[], Any]],
    timing: TimingSettings,
) -> dict[str, Any]:
    times = time_calls(calls, timing)
    one, many = times
    return {
        "workload": name,
        "unit": unit,
        "items": items,
        "one_device_ms": one.median_s * 1e3,
        "mesh_ms": many.median_s * 1e3,
        "one_device_per_s": items / one.median_s,
        "mesh_per_s": items / many.median_s,
        "mesh_over_one": one.median_s / many.median_s,
        "runs": one.runs,
    }


def _refine_many_row(cfg: Config, one, full) -> dict[str, Any]:
    """Nets refined a second by `refine_many` on one device and on all."""
    w = cfg.stack_width

    def make(key):
        return eqx.nn.MLP(
            w, w, w, 1, activation=jax.nn.relu, key=key, dtype=jnp.float32
        )

    stack = eqx.filter_vmap(make)(jr.split(jr.key(4), cfg.stack))

    def call(mesh):
        def run():
            out = refine_many(stack, cfg.K, linear="flow", mesh=mesh)
            return jax.block_until_ready(eqx.filter(out, eqx.is_array))

        return run

    return _throughput(
        f'refine_many: {cfg.stack} x MLP {w}-{w}-{w}, K={cfg.K}, "flow"',
        cfg.stack,
        "nets",
        [call(one), call(full)],
        cfg.slow_timing,
    )


def worker(cfg: Config) -> dict[str, Any]:
    """All measurements in this process: a 1-device mesh against all devices."""
    num = jax.device_count()
    one, full = make_mesh(1), make_mesh()
    rows = []
    start = time.perf_counter()
    rows.append(
        _throughput(
            f"training step: FlowNet n={cfg.n}, hidden={cfg.hidden}, "
            f"{cfg.blocks} blocks, adam, batch {cfg.train_batch}",
            cfg.train_batch,
            "examples",
            [_training_step(cfg, one), _training_step(cfg, full)],
            cfg.timing,
        )
    )
    mlp = _relu_mlp(cfg, jr.key(1))
    xs = jr.normal(jr.key(3), (cfg.eval_batch, cfg.d), jnp.float32)
    shape = f"MLP {cfg.d}-{cfg.width}x{cfg.depth}-{cfg.d_out}"
    models: dict[str, Any] = {"plain": mlp}
    for linear in LINEAR:
        models[linear] = _refined(mlp, cfg.K, linear)
    for label, model in models.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            cast, inputs = cast_tree((model, xs), dtype)
            what = (
                "plain net" if label == "plain" else f'refined (K={cfg.K}, "{label}")'
            )
            rows.append(
                _throughput(
                    f"evaluate {what}, {jnp.dtype(dtype).name}, {shape}, "
                    f"batch {cfg.eval_batch}",
                    cfg.eval_batch,
                    "inputs",
                    [_evaluation(cast, inputs, m) for m in (one, full)],
                    cfg.timing,
                )
            )
    rows.append(_refine_many_row(cfg, one, full))
    return {
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "num_devices": num,
        "throughput": rows,
        "bf16": _bf16_deviation(cfg),
        "wall_s": time.perf_counter() - start,
    }


# Reports


def markdown(result: dict[str, Any]) -> str:
    """The throughput table and the bfloat16 table."""
    meta, num = result["machine"], result["num_devices"]
    text = (
        f"Run {meta['date']} ({result['config']['name']}): {meta['cpu']}, "
        f"{meta['cores']} cores, backend {meta['backend']}, {num} devices "
        f"({result['devices_note']}); load average {meta['load_average_start'][0]} "
        f"at the start. Medians of {result['throughput'][0]['runs']}+ timed calls.\n\n"
        f"| workload | 1 device ms | {num} devices ms | 1 device /s "
        f"| {num} devices /s | speed-up |\n|---|---:|---:|---:|---:|---:|\n"
    )
    for row in result["throughput"]:
        text += (
            f"| {row['workload']} | {row['one_device_ms']:.3g} | {row['mesh_ms']:.3g} "
            f"| {row['one_device_per_s']:.3g} {row['unit']} "
            f"| {row['mesh_per_s']:.3g} {row['unit']} | {row['mesh_over_one']:.2f} |\n"
        )
    text += (
        "\nbfloat16 forward against float32, relative: max |f_bf16 - f_f32| / "
        "max |f_f32| for each net; and the float32 refinement error "
        "max |f_refined - f_plain| / max |f_plain| for comparison:\n\n"
        "| model | K | bf16 deviation | f32 refinement error |\n|---|---:|---:|---:|\n"
    )
    for row in result["bf16"]:
        K = "-" if row["K"] is None else row["K"]
        error = row.get("f32_refinement_error")
        error = "-" if error is None else f"{error:.2g}"
        text += f"| {row['model']} | {K} | {row['bf16_deviation']:.2g} | {error} |\n"
    return text


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.bench_sharding", description=__doc__
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices (default 8)"
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="use the visible devices (GPUs, TPU cores) instead of simulated ones",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements in a fresh process with the device count set."""
    env = dict(os.environ)
    command = [
        sys.executable,
        "-m",
        "experiments.benchmarks.bench_sharding",
        "--worker",
    ]
    if args.tiny:
        command.append("--tiny")
    if not args.real:
        flags = env.get("XLA_FLAGS", "")
        count = f"--xla_force_host_platform_device_count={args.devices}"
        env.update(XLA_FLAGS=f"{flags} {count}".strip(), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        command, env=env, cwd=HERE.parent.parent, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the benchmark process failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["devices_note"] = (
        "visible devices" if args.real else "simulated on the CPU, sharing its cores"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    cfg = TINY if args.tiny else FULL
    if args.worker:
        jax.config.update("jax_default_matmul_precision", "highest")
        print(json.dumps(worker(cfg)))
        return 0
    result = _child(args)
    out = args.out or (DEFAULT_OUT / "tiny" if args.tiny else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharding.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "sharding.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
