"""Measurements for tests/test_sharding.py, run in a subprocess on 8 CPU devices.

The parent pytest process has already started JAX with one device, so the tests
run this file with `XLA_FLAGS=--xla_force_host_platform_device_count=8` and read
the one JSON object it prints; the assertions are in the tests. float32 throughout
(`jax_enable_x64` stays off here).
"""

import functools
import json
import os
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from flowjax._classifier import FlowNet
from flowjax._refine import refine
from flowjax._sharding import (
    cast_tree,
    evaluate_sharded,
    make_mesh,
    refine_many,
)
from flowjax._training import fit


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _max_difference(a, b) -> float:
    a, b = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    gaps = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
    return max(jax.tree.leaves(gaps))


def _num_devices(tree) -> int:
    """The fewest devices any array of `tree` lives on."""
    arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return min(len(x.sharding.device_set) for x in arrays)


def _moons(num: int):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(num, 2)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int32)


def training() -> dict:
    """Four SGD steps on one device, on a (data 8) mesh and a (data 4, model 2)
    mesh."""
    data = _moons(256)
    net = FlowNet.init(
        2, 2, n=4, hidden=16, num_blocks=3, key=jr.key(0), dtype=jnp.float32
    )
    runs = {}
    for name, mesh in (
        ("single", None),
        ("data8", make_mesh()),
        ("data4_model2", make_mesh(model=2)),
    ):
        runs[name] = fit(
            net, optax.sgd(0.5), data, batch_size=64, steps=4, key=jr.key(1), mesh=mesh
        )
    single = runs["single"]
    W1 = runs["data4_model2"].model.grid.params.W1
    return {
        name: {
            "param_gap": _max_difference(single.model, run.model),
            "loss_gap": float(
                np.max(
                    np.abs(
                        np.subtract(
                            single.history.steps["loss"], run.history.steps["loss"]
                        )
                    )
                )
            ),
            "moved": _max_difference(net, run.model),
            "devices": _num_devices(run.model.grid.params),
        }
        for name, run in runs.items()
        if name != "single"
    } | {"W1_spec": str(W1.sharding.spec), "W1_shards": len(W1.addressable_shards)}


_TRACES: list[int] = []


class _Counting(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        _TRACES.append(1)  # runs only while tracing
        return self.linear(x)


def retracing() -> dict:
    """Traces and compilations after the first of 12 sharded steps (3 epochs)."""
    compiles: list[str] = []
    marks: dict[str, int] = {}

    def listen(event, duration, **kwargs):
        del duration, kwargs
        if event == COMPILE_EVENT:
            compiles.append(event)

    def callback(step, metrics):
        del metrics
        if step == 1:
            marks["traces"], marks["compiles"] = len(_TRACES), len(compiles)

    jax.monitoring.register_event_duration_secs_listener(listen)
    model = _Counting(eqx.nn.Linear(2, 2, key=jr.key(0), dtype=jnp.float32))
    fit(
        model,
        optax.adam(1e-2),
        _moons(256),
        batch_size=64,
        epochs=3,
        key=jr.key(0),
        task="classification",
        callback=callback,
        mesh=make_mesh(),
    )
    return {
        "traces_at_step_1": marks["traces"],
        "traces_after": len(_TRACES) - marks["traces"],
        "compiles_after": len(compiles) - marks["compiles"],
    }


def resuming(path: str) -> dict:
    """A sharded run of 6 steps against 3 steps, a checkpoint, and 3 more."""

    def run(steps, **checkpoint):
        return fit(
            eqx.nn.Linear(2, 2, key=jr.key(0), dtype=jnp.float32),
            optax.adam(1e-2),
            _moons(256),
            batch_size=32,
            steps=steps,
            key=jr.key(5),
            task="classification",
            mesh=make_mesh(),
            **checkpoint,
        )

    whole = run(6)
    run(3, checkpoint_path=path)
    resumed = run(6, checkpoint_path=path, resume=True)
    return {
        "gap": _max_difference(whole.model, resumed.model),
        "devices": _num_devices(resumed.model),
    }


def _relu_mlps(num: int, *, width: int = 8, depth: int = 1):
    keys = jr.split(jr.key(2), num)

    def make(key):
        return eqx.nn.MLP(
            3, 2, width, depth, activation=jax.nn.relu, key=key, dtype=jnp.float32
        )

    return eqx.filter_vmap(make)(keys)


def refinement() -> dict:
    """`refine_many` on 8 devices against `filter_vmap(refine)` on one; 12 and 6
    nets are padded to 16 and 8 (2 and 1 a device), then cut back."""
    results = {}
    for name, num, options in (
        ("flow12", 12, {"linear": "flow"}),
        ("whole6", 6, {"linear": "whole"}),
    ):
        mlps = _relu_mlps(num)
        sharded = refine_many(mlps, 4, **options)
        unsharded = eqx.filter_jit(
            eqx.filter_vmap(lambda m, options=options: refine(m, 4, **options))
        )(mlps)
        results[name] = {
            "gap": _max_difference(sharded, unsharded),
            "scale": max(
                float(jnp.max(jnp.abs(x)))
                for x in jax.tree.leaves(eqx.filter(unsharded, eqx.is_array))
            ),
            "same_structure": jax.tree.structure(sharded)
            == jax.tree.structure(unsharded),
            "stack": jax.tree.leaves(eqx.filter(sharded, eqx.is_array))[0].shape[0],
        }
    return results


def evaluation() -> dict:
    """`evaluate_sharded` of a refined net on 1001 inputs (not a multiple of 8)."""
    mlp = eqx.nn.MLP(
        3, 2, 16, 2, activation=jax.nn.relu, key=jr.key(4), dtype=jnp.float32
    )
    refined = refine(mlp, 4, linear="whole")
    xs = jr.normal(jr.key(3), (1001, 3), jnp.float32)
    expected = jax.vmap(refined)(xs)
    out = evaluate_sharded(refined, xs)
    out16 = evaluate_sharded(refined, xs, dtype=jnp.bfloat16)
    expected16 = jax.vmap(cast_tree(refined, jnp.bfloat16))(xs.astype(jnp.bfloat16))
    return {
        "gap": float(jnp.max(jnp.abs(out - expected))),
        "scale": float(jnp.max(jnp.abs(expected))),
        "shape": list(out.shape),
        "dtype": str(out.dtype),
        "devices": len(out.sharding.device_set),
        "bf16_dtype": str(out16.dtype),
        "bf16_gap": float(
            jnp.max(jnp.abs(out16.astype(jnp.float32) - expected16.astype(jnp.float32)))
        ),
    }


def _message(call) -> str:
    try:
        call()
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def errors() -> dict:
    """The messages of a batch the mesh cannot split and of a bad model axis."""
    return {
        "batch_size": _message(
            lambda: fit(
                eqx.nn.Linear(2, 2, key=jr.key(0), dtype=jnp.float32),
                optax.sgd(0.1),
                _moons(64),
                batch_size=12,
                steps=1,
                key=jr.key(0),
                task="classification",
                mesh="auto",
            )
        ),
        "model_axis": _message(lambda: make_mesh(model=3)),
    }


def main() -> None:
    results: dict = {
        "num_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "run.ckpt")
        checks = (
            training,
            retracing,
            functools.partial(resuming, checkpoint),
            refinement,
            evaluation,
            errors,
        )
        for check in checks:
            name = getattr(check, "__name__", "resuming")
            start = time.perf_counter()
            results[name] = check()
            results[name + "_seconds"] = time.perf_counter() - start
    print(json.dumps(results))


if __name__ == "__main__":
    main()
