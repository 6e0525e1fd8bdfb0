import io
import re
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.linalg

from flowjax._resnet import (
    ActivationBlock,
    Chain,
    DiagonalBlock,
    EulerResNet,
    LinearBlock,
    LinearMap,
    LinearStage,
    Stage,
    StretchStage,
    TranslationBlock,
    TranslationStage,
    TwoLayerBlock,
    homotopy_weights,
    parameter_count,
    storage_bytes,
)
from flowjax._two_layer import TwoLayerField, TwoLayerParams, uniform_grid


def _random_stack(rng, n, m, K, scale=1.0, dtype=np.float64):
    return TwoLayerParams(
        jnp.asarray(rng.normal(size=(K, m, n)), dtype),
        jnp.asarray(rng.normal(size=(K, m)), dtype),
        jnp.asarray(scale * rng.normal(size=(K, n, m)) / np.sqrt(m), dtype),
        jnp.asarray(scale * rng.normal(size=(K, n)), dtype),
    )


def _numpy_two_layer_euler(stack, ts, y, sigma=np.tanh):
    """Reference: the Euler steps written as a Python loop in NumPy."""
    W1, b1, W2, b2 = (np.asarray(a) for a in (stack.W1, stack.b1, stack.W2, stack.b2))
    ts = np.asarray(ts)
    states = [np.array(y, dtype=np.float64)]
    for k in range(len(ts) - 1):
        v = W2[k] @ sigma(W1[k] @ states[-1] + b1[k]) + b2[k]
        states.append(states[-1] + (ts[k + 1] - ts[k]) * v)
    return np.stack(states)


def _linear_field(A):
    A = jnp.asarray(A)

    def field(t, y, args):
        del t, args
        return A @ y

    return field


# EulerResNet


@pytest.mark.parametrize("uniform", [True, False])
def test_euler_resnet_matches_python_loop(rng, uniform):
    K = 7
    stack = _random_stack(rng, 3, 5, K)
    ts = (
        uniform_grid(K, 0.0, 2.0)
        if uniform
        else np.cumsum(rng.uniform(0.1, 0.5, K + 1))
    )
    resnet = EulerResNet(TwoLayerField(jnp.tanh), stack, ts)
    y0 = rng.normal(size=3)
    want = _numpy_two_layer_euler(stack, resnet.ts, y0)
    np.testing.assert_allclose(resnet.trajectory(jnp.asarray(y0)), want, rtol=1e-13)
    np.testing.assert_allclose(resnet(jnp.asarray(y0)), want[-1], rtol=1e-13)
    assert resnet.depth == K


def test_euler_resnet_pytree_state(rng):
    """A field on a (position, velocity) tuple: the harmonic oscillator, by hand."""

    def field(t, y, args):
        del t
        x, v = y
        return v, -args * x

    K = 5
    omega2 = jnp.asarray(rng.uniform(1, 2, K))
    resnet = EulerResNet(field, omega2, uniform_grid(K))
    x, v = 1.0, 0.0
    for k in range(K):
        x, v = x + 0.2 * v, v - 0.2 * float(omega2[k]) * x
    got = resnet((jnp.asarray(1.0), jnp.asarray(0.0)))
    np.testing.assert_allclose([got[0], got[1]], [x, v], rtol=1e-14)


def test_linear_field_closed_form(rng):
    A = rng.normal(size=(4, 4))
    T, K = 1.5, 12
    resnet = EulerResNet(_linear_field(A), None, uniform_grid(K, 0.0, T))
    y0 = rng.normal(size=4)
    want = np.linalg.matrix_power(np.eye(4) + A * T / K, K) @ y0
    np.testing.assert_allclose(resnet(jnp.asarray(y0)), want, rtol=1e-12)


def test_linear_field_converges_at_order_one(rng):
    A = rng.normal(size=(4, 4)) / 2
    T = 1.0
    y0 = rng.normal(size=4)
    exact = scipy.linalg.expm(A * T) @ y0
    Ks = np.array([8, 16, 32, 64, 128, 256])
    errors = []
    for K in Ks:
        resnet = EulerResNet(_linear_field(A), None, uniform_grid(int(K), 0.0, T))
        errors.append(np.linalg.norm(np.asarray(resnet(jnp.asarray(y0))) - exact))
    order = -np.polyfit(np.log(Ks), np.log(errors), 1)[0]
    assert 0.9 <= order <= 1.1, (order, errors)


def test_euler_resnet_float32(rng):
    stack = _random_stack(rng, 3, 4, 6, dtype=np.float32)
    resnet = EulerResNet(TwoLayerField(jax.nn.relu), stack)
    assert resnet.ts.dtype == jnp.float32
    y = resnet(jnp.ones(3, jnp.float32))
    assert y.dtype == jnp.float32
    # float64 grid, float32 state: the state keeps its dtype.
    resnet64 = EulerResNet(TwoLayerField(jax.nn.relu), stack, np.linspace(0, 1, 7))
    assert resnet64(jnp.ones(3, jnp.float32)).dtype == jnp.float32


def test_euler_resnet_vmap_and_jit_match_loop(rng):
    resnet = EulerResNet(TwoLayerField(jnp.tanh), _random_stack(rng, 3, 4, 9))
    Y = jnp.asarray(rng.normal(size=(6, 3)))
    batched = eqx.filter_jit(jax.vmap(lambda y: resnet(y)))(Y)
    looped = jnp.stack([resnet(y) for y in Y])
    np.testing.assert_allclose(batched, looped, rtol=1e-14, atol=1e-15)


def _directional_fd(loss, params, direction, eps=1e-6):
    plus = jtu.tree_map(lambda p, d: p + eps * d, params, direction)
    minus = jtu.tree_map(lambda p, d: p - eps * d, params, direction)
    return (loss(plus) - loss(minus)) / (2 * eps)


def _tree_dot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize("checkpoint", [False, True])
def test_euler_resnet_gradient_vs_finite_differences(rng, checkpoint):
    stack = _random_stack(rng, 3, 4, 8)
    ts = uniform_grid(8)
    y0 = jnp.asarray(rng.normal(size=3))
    field = TwoLayerField(jnp.tanh)

    def loss(params):
        return jnp.sum(EulerResNet(field, params, ts, checkpoint=checkpoint)(y0) ** 2)

    grad = jax.grad(loss)(stack)
    direction = jtu.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), stack)
    fd = _directional_fd(loss, stack, direction)
    np.testing.assert_allclose(_tree_dot(grad, direction), fd, rtol=1e-7)


def test_checkpoint_changes_nothing(rng):
    stack = _random_stack(rng, 3, 4, 5)
    y0 = jnp.asarray(rng.normal(size=3))
    field = TwoLayerField(jnp.tanh)

    def loss(params, checkpoint):
        return jnp.sum(EulerResNet(field, params, checkpoint=checkpoint)(y0) ** 2)

    g0 = jax.grad(loss)(stack, False)
    g1 = jax.grad(loss)(stack, True)
    for a, b in zip(jtu.tree_leaves(g0), jtu.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def _normalised_jaxpr(num_blocks):
    stack = _random_stack(np.random.default_rng(0), 4, 8, num_blocks)
    field = TwoLayerField(jnp.tanh)

    def run(params, ts, y):
        return EulerResNet(field, params, ts)(y)

    args = (stack, uniform_grid(num_blocks), jnp.ones(4))
    text = str(jax.make_jaxpr(run)(*args))
    return run, args, re.sub(r"\s+", " ", re.sub(r"\d+", "N", text))


def test_jaxpr_does_not_grow_with_blocks():
    _, _, small = _normalised_jaxpr(10)
    _, _, large = _normalised_jaxpr(1000)
    assert small == large


def _compile_seconds(run, args, repeats=3):
    best = np.inf
    for _ in range(repeats):
        fresh = jax.jit(lambda *a: jax.value_and_grad(lambda *b: jnp.sum(run(*b)))(*a))
        start = time.perf_counter()
        fresh.lower(*args).compile()
        best = min(best, time.perf_counter() - start)
    return best


def test_compile_time_does_not_grow_with_blocks():
    run10, args10, _ = _normalised_jaxpr(10)
    run1000, args1000, _ = _normalised_jaxpr(1000)
    t10 = _compile_seconds(run10, args10)
    t1000 = _compile_seconds(run1000, args1000)
    print(f"compile (forward + gradient): 10 blocks {t10:.3f}s, 1000 {t1000:.3f}s")
    assert t1000 <= 3 * t10


def test_euler_resnet_bad_inputs(rng):
    field = TwoLayerField(jnp.tanh)
    stack = _random_stack(rng, 2, 3, 4)
    with pytest.raises(ValueError, match="params.*or the time grid"):
        EulerResNet(field)
    with pytest.raises(ValueError, match="expected 5"):
        EulerResNet(field, stack, uniform_grid(3))
    with pytest.raises(ValueError, match="strictly increasing"):
        EulerResNet(field, stack, [0.0, 0.2, 0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="leading"):
        EulerResNet(field, {"a": jnp.zeros((4, 2)), "b": jnp.zeros((3, 2))})


# Blocks and stages


def _special_values(dtype):
    finfo = np.finfo(dtype)
    values = [-3.7, -1.0, -finfo.tiny, -finfo.smallest_subnormal, -0.0, 0.0]
    values += [finfo.smallest_subnormal, finfo.tiny, 0.3, 2.5, finfo.max / 4]
    values += [-finfo.max / 4, 1e-3, -1e-3]
    return np.array(values, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_stage_is_bitwise_relu(rng, dtype):
    y = np.concatenate([_special_values(dtype), rng.normal(size=50).astype(dtype)])
    want = np.asarray(jax.nn.relu(jnp.asarray(y)))
    run = eqx.filter_jit(lambda stage, y: stage(y))
    for K in range(1, 65):
        stage = Stage(ActivationBlock(homotopy_weights(K, dtype=dtype), jax.nn.relu))
        got = np.asarray(run(stage, jnp.asarray(y)))
        assert got.dtype == dtype
        assert np.array_equal(
            got.view(f"u{got.itemsize}"), want.view(f"u{got.itemsize}")
        ), K


@pytest.mark.parametrize("K", [1, 3, 17])
def test_leaky_relu_stage_is_exact(rng, K):
    a = 0.1
    y = jnp.asarray(rng.normal(size=40) * 3)
    sigma = jax.tree_util.Partial(jax.nn.leaky_relu, negative_slope=a)
    stage = Stage(ActivationBlock(homotopy_weights(K, negative_slope=a), sigma))
    np.testing.assert_allclose(stage(y), np.where(y > 0, y, a * y), rtol=1e-14)


def test_activation_stage_trajectory_is_the_homotopy(rng):
    """z_k = relu(y) + (1 - k/K)(y - relu(y)) (eq. 56-58)."""
    K = 6
    y = rng.normal(size=10)
    stage = Stage(ActivationBlock(homotopy_weights(K), jax.nn.relu))
    s = np.arange(K + 1)[:, None] / K
    want = np.maximum(y, 0) + (1 - s) * (y - np.maximum(y, 0))
    np.testing.assert_allclose(stage.trajectory(jnp.asarray(y)), want, atol=1e-15)


def test_homotopy_weights_bad_inputs():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        homotopy_weights(0)
    with pytest.raises(TypeError, match="int"):
        homotopy_weights(2.5)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="negative_slope"):
        homotopy_weights(3, negative_slope=1.0)


@pytest.mark.parametrize("K", [1, 2, 8])
def test_implicit_stretch_is_stable(rng, K):
    lam = np.array([-100.0, -100.0, -3.0, 0.7])
    y0 = rng.normal(size=4)
    implicit = StretchStage(lam, jnp.ones(K))(jnp.asarray(y0))
    # Backward Euler on lam < 0, forward Euler on lam >= 0; closed forms.
    factor = np.where(lam < 0, (1 - lam / K) ** (-K), (1 + lam / K) ** K)
    np.testing.assert_allclose(implicit, factor * y0, rtol=1e-13)
    assert np.all(np.abs(implicit[:3]) <= np.abs(y0[:3]))
    # Explicit Euler blows the same directions up (K < kappa / 2).
    explicit = StretchStage(lam, jnp.ones(K), scheme="explicit")(jnp.asarray(y0))
    assert np.all(np.abs(explicit[:2]) > 10 * np.abs(y0[:2]))
    exact = StretchStage(lam, jnp.ones(K), scheme="exact")(jnp.asarray(y0))
    np.testing.assert_allclose(exact, np.exp(lam) * y0, rtol=1e-12, atol=1e-15)


def test_implicit_stretch_converges_at_order_one(rng):
    lam = np.array([-3.0, -0.5, 0.0, 0.8])
    y0 = rng.normal(size=4)
    Ks = np.array([8, 16, 32, 64, 128])
    errors = [
        np.linalg.norm(
            StretchStage(lam, jnp.ones(int(K)))(jnp.asarray(y0)) - np.exp(lam) * y0
        )
        for K in Ks
    ]
    order = -np.polyfit(np.log(Ks), np.log(errors), 1)[0]
    assert 0.9 <= order <= 1.1


def test_linear_stage_is_euler_on_the_linear_field(rng):
    n, K = 5, 16
    G = rng.normal(size=(n, n))
    c = rng.uniform(0.5, 1.5, K)
    ts = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, K - 1)]))
    tied = LinearStage(G, c, ts)

    def field(t, y, ck):
        del t
        return ck * (jnp.asarray(G) @ y)

    reference = EulerResNet(field, jnp.asarray(c), ts)
    y0 = jnp.asarray(rng.normal(size=n))
    np.testing.assert_allclose(tied(y0), reference(y0), rtol=1e-13)
    untied = tied.untie()
    assert isinstance(untied.blocks, LinearBlock) and untied.depth == K
    np.testing.assert_allclose(untied(y0), tied(y0), rtol=1e-13)
    np.testing.assert_allclose(untied.trajectory(y0), tied.trajectory(y0), rtol=1e-13)


def test_tied_storage_does_not_grow_with_blocks(rng):
    n = 16
    G = rng.normal(size=(n, n))
    tied = {K: LinearStage(G, np.ones(K)) for K in (8, 1024)}
    # Only the per-block scalars (c and the grid) grow; G is stored once.
    grown = storage_bytes(tied[1024]) - storage_bytes(tied[8])
    assert grown == 2 * (1024 - 8) * 8
    untied = tied[1024].untie()
    assert storage_bytes(untied) >= 1024 * n * n * 8
    assert parameter_count(untied) == 1024 * n * n


def test_translation_and_stretch_untie(rng):
    n, K = 4, 5
    b = rng.normal(size=n)
    y0 = jnp.asarray(rng.normal(size=n))
    translation = TranslationStage(b, np.ones(K))
    np.testing.assert_allclose(translation(y0), y0 + b, rtol=1e-14)
    assert isinstance(translation.untie().blocks, TranslationBlock)
    np.testing.assert_allclose(translation.untie()(y0), translation(y0), rtol=1e-14)
    for scheme in ("explicit", "implicit", "exact"):
        stretch = StretchStage(-rng.uniform(0, 5, n), np.ones(K), scheme=scheme)
        assert isinstance(stretch.untie().blocks, DiagonalBlock)
        np.testing.assert_allclose(stretch.untie()(y0), stretch(y0), rtol=1e-14)


def test_two_layer_block_stage_equals_euler_resnet(rng):
    K = 6
    stack = _random_stack(rng, 3, 4, K)
    ts = uniform_grid(K, 0.0, 1.5)
    resnet = EulerResNet(TwoLayerField(jnp.tanh), stack, ts)
    stage = Stage(TwoLayerBlock(stack, ts[1:] - ts[:-1], jnp.tanh))
    y0 = jnp.asarray(rng.normal(size=3))
    np.testing.assert_array_equal(stage(y0), resnet(y0))
    np.testing.assert_allclose(
        stage.block(2)(y0), y0 + 0.25 * stage.block(2).velocity(y0)
    )


def test_stage_from_blocks(rng):
    blocks = [ActivationBlock(a, jax.nn.relu) for a in homotopy_weights(4)]
    stage = Stage.from_blocks(blocks)
    assert stage.depth == 4 and stage.block_kind == "ActivationBlock"
    with pytest.raises(ValueError, match="one kind"):
        Stage.from_blocks([*blocks, ActivationBlock(0.5, jnp.tanh)])
    with pytest.raises(ValueError, match="one kind"):
        Stage.from_blocks([LinearBlock(jnp.eye(2)), DiagonalBlock(jnp.ones(2))])
    with pytest.raises(TypeError, match="AbstractBlock"):
        Stage(jnp.ones(3))  # pyright: ignore[reportArgumentType]


def test_stage_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        LinearStage(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="c must have shape"):
        LinearStage(np.eye(2), np.ones((2, 2)))
    with pytest.raises(ValueError, match="scheme"):
        StretchStage(np.ones(2), np.ones(2), scheme="rk4")  # pyright: ignore
    with pytest.raises(ValueError, match="expected"):
        LinearMap(np.ones((2, 3)), np.ones(3))


def test_stages_float32():
    y = jnp.ones(3, jnp.float32)
    stages = [
        LinearStage(np.eye(3), np.ones(4)),
        StretchStage(-np.ones(3), np.ones(4)),
        TranslationStage(np.ones(3), np.ones(4)),
        Stage(ActivationBlock(homotopy_weights(3), jnp.tanh)),
        LinearMap(np.eye(3), np.ones(3)),
    ]
    for stage in stages:
        assert stage(y).dtype == jnp.float32, type(stage).__name__


# Chain


def _example_chain(rng, n=3, K=4):
    stack = _random_stack(rng, n, 5, K)
    return Chain(
        [
            LinearMap(rng.normal(size=(n, n)), rng.normal(size=n)),
            LinearStage(rng.normal(size=(n, n)), np.ones(K)),
            StretchStage(-rng.uniform(0, 50, n), np.ones(K)),
            TranslationStage(rng.normal(size=n), np.ones(K)),
            Stage(ActivationBlock(homotopy_weights(K), jax.nn.relu)),
            LinearMap(rng.normal(size=(n, n)), None),
            EulerResNet(TwoLayerField(jnp.tanh), stack),
        ]
    )


def test_chain_reports_depth_counts_and_parameters(rng):
    chain = _example_chain(rng)
    assert chain.depth == 5 * 4
    assert chain.block_counts() == {
        "LinearMap": 2,
        "LinearBlock": 4,
        "DiagonalBlock": 4,
        "TranslationBlock": 4,
        "ActivationBlock": 4,
        "Euler[TwoLayerField]": 4,
    }
    sizes = sum(np.size(x) for x in jtu.tree_leaves(chain) if eqx.is_array(x))
    assert chain.num_params == sizes == parameter_count(chain)
    y0 = jnp.asarray(rng.normal(size=3))
    y = y0
    for stage in chain.stages:
        y = stage(y)
    np.testing.assert_array_equal(chain(y0), y)
    assert not chain.stages[0].is_residual and chain.stages[0].depth == 0


def test_chain_serialisation_round_trip(rng):
    chain = _example_chain(rng)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, chain)
    buffer.seek(0)
    skeleton = jtu.tree_map(
        lambda x: jnp.zeros_like(x) if eqx.is_array(x) else x, _example_chain(rng)
    )
    loaded = eqx.tree_deserialise_leaves(buffer, skeleton)
    for a, b in zip(jtu.tree_leaves(chain), jtu.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    y0 = jnp.asarray(rng.normal(size=3))
    np.testing.assert_array_equal(loaded(y0), chain(y0))


def test_chain_vmap_matches_loop(rng):
    chain = _example_chain(rng)
    Y = jnp.asarray(rng.normal(size=(5, 3)))
    batched = eqx.filter_jit(jax.vmap(lambda y: chain(y)))(Y)
    np.testing.assert_allclose(batched, jnp.stack([chain(y) for y in Y]), rtol=1e-13)


def test_chain_rejects_non_stages():
    with pytest.raises(TypeError, match="stage 1 is a function"):
        Chain([LinearMap(np.eye(2), None), lambda y: y])  # pyright: ignore


def test_stack_of_chains_under_vmap(rng):
    """A stack of networks of one shape is a batched Chain (as refine on a stack)."""
    B, K, n = 3, 4, 3

    def make(G, b, stack):
        return Chain(
            [
                LinearStage(G, jnp.ones(K)),
                TranslationStage(b, jnp.ones(K)),
                Stage(ActivationBlock(homotopy_weights(K), jax.nn.relu)),
                EulerResNet(TwoLayerField(jnp.tanh), stack),
            ]
        )

    Gs = jnp.asarray(rng.normal(size=(B, n, n)))
    bs = jnp.asarray(rng.normal(size=(B, n)))
    stacks = _random_stack(rng, n, 5, B * K)
    stacks = jtu.tree_map(lambda a: a.reshape(B, K, *a.shape[1:]), stacks)
    batched = eqx.filter_vmap(make)(Gs, bs, stacks)
    assert batched.depth == 4 * K
    assert batched.block_counts()["ActivationBlock"] == K
    Y = jnp.asarray(rng.normal(size=(B, n)))
    got = eqx.filter_vmap(lambda chain, y: chain(y))(batched, Y)
    for i in range(B):
        stack_i = jtu.tree_map(lambda a, i=i: a[i], stacks)
        one = make(Gs[i], bs[i], stack_i)
        np.testing.assert_allclose(got[i], one(Y[i]), rtol=1e-13)
