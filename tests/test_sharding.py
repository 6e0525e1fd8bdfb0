"""Sharding: data-parallel training, sharded refinement and evaluation, bfloat16.

The multi-device checks run `tests/sharding_checks.py` once in a subprocess with 8
simulated CPU devices (this process has already started JAX with one device) and
assert on the figures it prints; the bfloat16 and argument checks run here.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from flowjax._refine import refine
from flowjax._sharding import (
    DISTRIBUTED_FLAG,
    add_distributed_flag,
    as_mesh,
    batch_axes,
    cast_tree,
    evaluate_sharded,
    make_mesh,
    maybe_initialize_distributed,
    param_spec,
    refine_many,
)
from flowjax._training import fit


SCRIPT = Path(__file__).with_name("sharding_checks.py")
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits
TOLERANCE = 1e-5  # float32 results of a sharded and a one-device run


@pytest.fixture(scope="module")
def measured() -> dict:
    """The JSON figures of `sharding_checks.py` on 8 simulated CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip(),
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "0",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        cwd=SCRIPT.parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Eight devices (subprocess)


def test_the_subprocess_has_eight_devices(measured):
    assert measured["num_devices"] == 8


@pytest.mark.parametrize("mesh", ["data8", "data4_model2"])
def test_sharded_training_equals_one_device(measured, mesh):
    run = measured["training"][mesh]
    assert run["devices"] == 8  # the parameters live on the whole mesh
    assert run["moved"] > 1e-2  # four SGD steps changed the parameters
    assert run["param_gap"] <= TOLERANCE
    assert run["loss_gap"] <= TOLERANCE


def test_model_axis_splits_the_hidden_width(measured):
    # W1 (L, m, n) is split along m over "model", replicated over "data".
    assert measured["training"]["W1_spec"] == "P(None, 'model')"
    assert measured["training"]["W1_shards"] == 8


def test_sharded_step_is_compiled_once(measured):
    counts = measured["retracing"]
    assert counts["traces_at_step_1"] >= 1
    assert counts["traces_after"] == 0
    assert counts["compiles_after"] == 0


def test_sharded_run_resumes_bit_for_bit(measured):
    assert measured["resuming"]["devices"] == 8
    assert measured["resuming"]["gap"] == 0.0


@pytest.mark.parametrize("case, size", [("flow12", 12), ("whole6", 6)])
def test_sharded_refinement_equals_unsharded(measured, case, size):
    result = measured["refinement"][case]
    assert result["same_structure"]
    assert result["stack"] == size  # padded to a multiple of 8, then cut back
    assert result["gap"] <= TOLERANCE


def test_sharded_evaluation_equals_vmap(measured):
    result = measured["evaluation"]
    assert result["shape"] == [1001, 2]  # 1001 inputs: padded to 1008, cut back
    assert result["dtype"] == "float32"
    assert result["devices"] == 8
    assert result["gap"] <= TOLERANCE * max(1.0, result["scale"])
    assert result["bf16_dtype"] == "bfloat16"
    assert result["bf16_gap"] <= BF16_UNIT_ROUNDOFF


def test_errors_name_the_batch_and_the_devices(measured):
    batch = measured["errors"]["batch_size"]
    assert batch.startswith("ValueError") and "batch_size=12" in batch
    assert "8" in batch
    model = measured["errors"]["model_axis"]
    assert model.startswith("ValueError") and "model=3" in model


# One device (this process)


def _relu_mlp(key=0, width=16):
    return eqx.nn.MLP(
        4, 2, width, 2, activation=jax.nn.relu, key=jr.key(key), dtype=jnp.float32
    )


@functools.cache
def _refined_relu(linear: str):
    """A float32 ReLU MLP (4 -> 16 -> 16 -> 2) refined with K = 4 (jitted: faster
    than eager here)."""
    return eqx.filter_jit(lambda m: refine(m, 4, linear=linear))(_relu_mlp())


def _jaxpr_dtypes(jaxpr: jex.Jaxpr, found: set[str]) -> set[str]:
    """Every dtype of every variable of `jaxpr` and of its sub-jaxprs, and the
    names of callback primitives, if any."""
    variables = [*jaxpr.constvars, *jaxpr.invars, *jaxpr.outvars]
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            found.add(eqn.primitive.name)
        variables += [*eqn.invars, *eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    _jaxpr_dtypes(sub.jaxpr, found)
                elif isinstance(sub, jex.Jaxpr):
                    _jaxpr_dtypes(sub, found)
    found.update(str(v.aval.dtype) for v in variables if hasattr(v.aval, "dtype"))
    return found


@pytest.mark.parametrize("linear", ["whole", "flow"])
def test_bfloat16_forward_has_no_float64_and_no_callback(linear):
    assert jax.config.read("jax_enable_x64")  # the hardest setting for this check
    refined = cast_tree(_refined_relu(linear), jnp.bfloat16)
    forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    x = jnp.ones((8, 4), jnp.bfloat16)
    closed = jax.make_jaxpr(forward)(refined, x)
    found = _jaxpr_dtypes(closed.jaxpr, set())
    assert "bfloat16" in found
    assert not {"float64", "float32", "float16"} & found
    assert not any("callback" in name for name in found)
    assert forward(refined, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("linear, bound", [("whole", 4), ("flow", 16)])
def test_bfloat16_deviation_of_a_refined_relu_net(linear, bound):
    # Relative deviation max|f_bf16 - f_f32| / max|f_f32| on 512 inputs, K = 4.
    # "whole": exact ReLU blocks, so about the plain net's bf16 error (measured
    # 5.3e-3); "flow": 16 residual blocks a layer each round the state (measured
    # 2.6e-2, growing with K). Bounds in units of the unit roundoff 2^-8.
    refined = _refined_relu(linear)
    xs = jr.normal(jr.key(1), (512, 4), jnp.float32)
    out32 = jax.vmap(refined)(xs)
    out16 = evaluate_sharded(refined, xs, dtype=jnp.bfloat16)
    deviation = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32)))
    relative = deviation / float(jnp.max(jnp.abs(out32)))
    assert out16.dtype == jnp.bfloat16
    assert BF16_UNIT_ROUNDOFF / 16 < relative <= bound * BF16_UNIT_ROUNDOFF


def test_cast_tree_casts_floating_arrays_only():
    tree = {"W": jnp.ones((2, 2), jnp.float32), "i": jnp.arange(3), "name": "relu"}
    cast = cast_tree(tree, jnp.bfloat16)
    assert cast["W"].dtype == jnp.bfloat16
    assert cast["i"].dtype == tree["i"].dtype
    assert cast["name"] == "relu"
    with pytest.raises(TypeError, match="floating dtype"):
        cast_tree(tree, jnp.int32)


def test_fit_on_a_one_device_mesh_equals_fit_without_one():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int32)
    model = eqx.nn.Linear(2, 2, key=jr.key(0), dtype=jnp.float32)
    runs = [
        fit(
            model,
            optax.sgd(0.5),
            (X, y),
            batch_size=16,
            steps=3,
            key=jr.key(1),
            task="classification",
            mesh=mesh,
        )
        for mesh in (None, "auto")
    ]
    assert runs[1].model.weight.sharding.mesh.axis_names == ("data", "model")
    np.testing.assert_allclose(runs[0].model.weight, runs[1].model.weight, atol=1e-6)
    assert float(jnp.max(jnp.abs(runs[0].model.weight - model.weight))) > 1e-3


def test_refine_many_and_evaluate_sharded_on_one_device():
    mlps = eqx.filter_vmap(_relu_mlp)(jnp.arange(3))
    refined = refine_many(mlps, 2, linear="whole")
    xs = jr.normal(jr.key(2), (3, 4), jnp.float32)
    expected = eqx.filter_vmap(lambda m, x: m(x))(mlps, xs)
    got = eqx.filter_vmap(lambda m, x: m(x))(refined, xs)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    one = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, refined)
    np.testing.assert_allclose(evaluate_sharded(one, xs), jax.vmap(one)(xs), atol=1e-6)


def test_param_spec_splits_the_longer_divisible_axis():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    P = jax.sharding.PartitionSpec
    assert param_spec((3, 16, 4), mesh) == P(None, "model")  # W1 (L, m, n)
    assert param_spec((3, 4, 16), mesh) == P(None, None, "model")  # W2 (L, n, m)
    assert param_spec((3, 5, 7), mesh) == P()  # nothing divisible
    assert param_spec((16,), mesh) == P()  # vectors are replicated
    no_model = jax.sharding.AbstractMesh((8,), ("data",))
    assert param_spec((3, 16, 4), no_model) == P()


def test_a_users_mesh_gets_auto_axes_and_its_batch_axes():
    explicit = jax.make_mesh((1,), ("batch",))  # Explicit axes by default
    mesh = as_mesh(explicit)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert mesh.devices.tolist() == explicit.devices.tolist()
    assert batch_axes(mesh) == ("batch",)
    with pytest.raises(ValueError, match="only a 'model' axis"):
        batch_axes(jax.sharding.AbstractMesh((1,), ("model",)))


def test_bad_meshes_and_stacks():
    with pytest.raises(ValueError, match="num_devices=2"):
        make_mesh(2)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        as_mesh("all")  # pyright: ignore[reportArgumentType]
    ragged = {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}
    with pytest.raises(ValueError, match=r"refine_many.*\(3, 2\)"):
        refine_many(ragged, 2)
    with pytest.raises(ValueError, match="leading batch axis"):
        evaluate_sharded(_relu_mlp(), jnp.float32(1.0))


def test_distributed_flag():
    parser = argparse.ArgumentParser()
    add_distributed_flag(parser)
    assert parser.parse_args([DISTRIBUTED_FLAG]).distributed is True
    assert parser.parse_args([]).distributed is False
    assert maybe_initialize_distributed(False) is False
    assert not jax.distributed.is_initialized()
