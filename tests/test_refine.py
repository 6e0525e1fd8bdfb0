"""`flowjax.refine`: a plain net re-discretized as a residual network (sec. 4)."""

import functools
import io
import re
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as_array, load_case, random_sequential, sequential
from hypothesis import given, settings, strategies as st

from flowjax._activation_blocks import (
    ActivationStage,
    AugmentedStage,
    LeakyReluBlock,
    homotopy_grid,
    relu_family_weights,
)
from flowjax._certificate import fitted_order
from flowjax._refine import RefinedNet, refine, refinement_error
from flowjax._resnet import (
    DiagonalBlock,
    LinearBlock,
    LinearMap,
    Stage,
    StretchStage,
    TranslationBlock,
    storage_bytes,
)
from flowjax._time_scaling import TimeScaling


@eqx.filter_jit
def _apply(model, xs):
    return jax.vmap(model)(xs)


@eqx.filter_jit
def _call(model, x):
    return model(x)


def _mlp(rng, in_size, out_size, width, depth, dtype=np.float64, **kwargs):
    key = jax.random.key(int(rng.integers(2**31)))
    return eqx.nn.MLP(in_size, out_size, width, depth, key=key, dtype=dtype, **kwargs)


def _inputs(rng, model_in_size, num, dtype=np.float64, scale=2.0):
    shape = (num,) if model_in_size == "scalar" else (num, model_in_size)
    return jnp.asarray(scale * rng.normal(size=shape), dtype)


def _unit_layer(sigma):
    """One plain layer `sigma(y)` of width 1: the activation stage on its own."""
    return sequential([np.eye(1)], [np.zeros(1)], [sigma])


# Exactness with linear="whole" (eq. 51, 56-58, sec. 4.4)


LEAKY = functools.partial(jax.nn.leaky_relu, negative_slope=0.1)
RELU_FAMILY = {
    "relu": jax.nn.relu,
    "leaky_relu": LEAKY,
    "relu6": jax.nn.relu6,
    "hard_tanh": jax.nn.hard_tanh,
    "identity": jax.nn.identity,
}
SMOOTH = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus}
ACTIVATIONS = {**RELU_FAMILY, **SMOOTH}
SIZES = st.one_of(st.just("scalar"), st.integers(1, 12))
ARCHITECTURES = {
    "seed": st.integers(0, 2**31 - 1),
    "in_size": SIZES,
    "out_size": SIZES,
    "width": st.integers(1, 64),
    "depth": st.integers(0, 4),
    "use_bias": st.booleans(),
    "use_final_bias": st.booleans(),
    "dtype": st.sampled_from([np.float32, np.float64]),
    "num_steps": st.integers(1, 12),
}


def _check_whole_refinement(
    seed, in_size, out_size, width, depth, hidden, final, use_bias, use_final_bias,
    dtype, num_steps,
):  # fmt: skip
    rng = np.random.default_rng(seed)
    options = {"activation": ACTIVATIONS[hidden], "use_bias": use_bias}
    options["use_final_bias"] = use_final_bias
    if depth == 0:
        final = "identity"  # eqx.nn.MLP of depth 0 ignores its final_activation
    if final != "identity":
        options["final_activation"] = ACTIVATIONS[final]
    mlp = _mlp(rng, in_size, out_size, width, depth, dtype, **options)
    refined = refine(mlp, num_steps)
    xs = _inputs(rng, in_size, 16, dtype)
    plain, out = _apply(mlp, xs), _apply(refined, xs)
    assert out.shape == plain.shape and out.dtype == plain.dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    scale = max(1.0, float(jnp.max(jnp.abs(plain))))
    np.testing.assert_allclose(out, plain, rtol=0, atol=rtol * scale)
    used = {hidden, final} if depth > 0 else {final}
    if used <= {"relu", "identity"}:
        # Bitwise. Op by op, since a compiled program may lay out and round a
        # product differently depending on what surrounds it (XLA's choice).
        with jax.disable_jit():
            for x in xs[:3]:
                np.testing.assert_array_equal(refined(x), mlp(x))


@settings(max_examples=15, deadline=None)
@given(
    hidden=st.sampled_from(sorted(RELU_FAMILY)),
    final=st.sampled_from(sorted(RELU_FAMILY)),
    **ARCHITECTURES,
)
def test_whole_refinement_of_relu_family_equals_the_mlp(**example):
    """Bitwise for ReLU (eq. 56-58), to rounding for the other piecewise-linear
    activations (1e-5 relative in float32, 1e-12 in float64)."""
    _check_whole_refinement(**example)


@settings(max_examples=10, deadline=None)
@given(
    hidden=st.sampled_from(sorted(SMOOTH)),
    final=st.sampled_from(sorted(ACTIVATIONS)),
    **ARCHITECTURES,
)
def test_whole_refinement_with_exact_inverse_equals_the_mlp(**example):
    """Smooth activations, `activation="exact"`: to rounding for every K (sec. 4.4).
    Fewer examples: each compiles a Newton solve per layer."""
    _check_whole_refinement(**example)


@pytest.mark.parametrize("scaling", ["linear", "smooth", "cubic"])
@pytest.mark.parametrize("num_steps", [1, 3])
def test_step_rule_is_exact_on_every_grid(rng, scaling, num_steps):
    """Steps of the homotopy, not `tau'(s_k) / K`: exact even at one step, where
    the literal time-scaled step would do nothing (math.md sec. 6 item 1)."""
    for sigma in (jax.nn.relu, LEAKY, jnp.tanh, jax.nn.relu6):
        mlp = _mlp(rng, 3, 2, 6, 2, activation=sigma)
        refined = refine(mlp, num_steps, time_scaling=scaling)
        xs = _inputs(rng, 3, 32, scale=4.0)
        assert refinement_error(mlp, refined, xs) <= 1e-12


@pytest.mark.parametrize("activation", ["exact", "augmented"])
def test_smooth_grid_in_float32_stays_exact(rng, activation):
    """On the smooth grid tau(k/K) rounds to 1 before the end (3 of 64 points in
    float32): the blocks use that rounded grid consistently and stay exact."""
    xs = _inputs(rng, 4, 64, np.float32, scale=4.0)
    for sigma in (jnp.tanh, jax.nn.softplus, jax.nn.relu):
        mlp = _mlp(rng, 4, 3, 16, 2, np.float32, activation=sigma)
        refined = refine(mlp, 64, time_scaling="smooth", activation=activation)
        plain, out = _apply(mlp, xs), _apply(refined, xs)
        if sigma is jax.nn.relu:
            with jax.disable_jit():
                np.testing.assert_array_equal(refined(xs[0]), mlp(xs[0]))
        scale = max(1.0, float(jnp.max(jnp.abs(plain))))
        np.testing.assert_allclose(out, plain, rtol=0, atol=1e-5 * scale)


def test_relu_stage_weights_end_at_one():
    """The last ReLU weight is exactly 1 on every grid, which makes the stage
    bitwise `relu`; leaky weights keep every factor `1 - alpha (1 - a)` in [0, 1)."""
    for scaling in ("linear", "smooth", "cubic"):
        grid = homotopy_grid(7, TimeScaling(scaling))
        assert relu_family_weights(grid, 0.0)[-1] == 1.0
        alpha = relu_family_weights(grid, 0.3)
        assert np.all((alpha > 0) & (alpha * 0.7 <= 1))
        np.testing.assert_allclose(grid.ds.sum(), 1.0, rtol=1e-15)
    uniform = homotopy_grid(9, TimeScaling("linear"))
    np.testing.assert_allclose(
        relu_family_weights(uniform, 0.0), 1 / (9 - np.arange(9)), rtol=1e-15
    )


@pytest.mark.parametrize("a", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("scaling", ["linear", "smooth"])
@pytest.mark.parametrize("K", [1, 32, 70])
def test_leaky_relu_stack_equals_its_blocks_one_by_one(a, scaling, K):
    """`LeakyReluBlock.chain` (the split `p + m` form) against `K` separate block
    calls (the definition, eq. 56-58), both against the stage's closed form in
    float64 within their rounding bound, and ReLU bit for bit."""
    grid = homotopy_grid(K, TimeScaling(scaling), np.float32)
    alpha = relu_family_weights(grid, a)
    y = np.concatenate([np.linspace(-40, 40, 401), [0.0, -0.0, 1e-30, -1e-30]])
    y32 = jnp.asarray(y, jnp.float32)
    stack = LeakyReluBlock(jnp.asarray(alpha, jnp.float32), a)
    by_blocks = y32
    for k in range(K):
        by_blocks = LeakyReluBlock(jnp.asarray(alpha[k], jnp.float32), a)(by_blocks)

    # Block k scales a negative entry by c_k = 1 - w_k; forming c_k (or y - w_k y)
    # in float32 costs eps (1 + w_k / c_k) relative, the product eps more.
    w = alpha.astype(np.float64) * (1 - a)
    c = 1 - w
    eps = float(np.finfo(np.float32).eps)
    bound = eps * np.sum(2 + np.divide(w, c, out=np.zeros_like(w), where=c > 0))
    exact = np.where(y < 0, a * np.float64(np.float32(y)), np.float32(y))
    for unroll in (1, 4, 32):
        chained = eqx.filter_jit(lambda y, u=unroll: stack.chain(y, u))(y32)
        for out in (chained, by_blocks):
            np.testing.assert_allclose(out, exact, rtol=bound, atol=1e-37)
        if a == 0.0:
            np.testing.assert_array_equal(chained, jax.nn.relu(y32))
            np.testing.assert_array_equal(by_blocks, jax.nn.relu(y32))


def test_relu_stack_has_relus_derivative_at_zero():
    """At a pre-activation of exactly 0 (e.g. zero bias, zero input) the refined
    net's derivative is ReLU's (0), for stages with and without a loop."""
    mlp = eqx.nn.MLP("scalar", "scalar", 1, 1, key=jax.random.key(0))
    mlp = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight),
        mlp,
        (jnp.ones((1, 1)), jnp.zeros(1), jnp.ones((1, 1))),
    )
    for K in (1, 33):
        refined = refine(mlp, K)
        for x in (0.0, -0.0):
            assert float(jax.grad(refined)(x)) == float(jax.grad(mlp)(x)) == 0.0


def test_float32_in_float32_out(rng):
    mlp = _mlp(rng, 4, 3, 8, 2, np.float32, activation=jnp.tanh)
    for linear in ("whole", "flow"):
        refined = refine(mlp, 4, linear=linear)
        assert _call(refined, jnp.ones(4, jnp.float32)).dtype == jnp.float32


# Convergence with linear="flow" (eq. 52-53)


def _rank_deficient_net(rng, sigma):
    """Widths 4-6-6-3, square layers with det < 0, and a middle layer of rank 3."""
    net = random_sequential(rng, (4, 6, 6, 3), sigma, negative_det=True)
    W = np.asarray(net.layers[2].weight)
    U, s, Vt = np.linalg.svd(W)
    s[3:] = 0.0
    return eqx.tree_at(lambda m: m.layers[2].weight, net, jnp.asarray((U * s) @ Vt))


STEPS = [8, 16, 32, 64, 128, 256]


def _flow_errors(net, xs, steps, **options):
    return [
        refinement_error(net, refine(net, K, linear="flow", **options), xs)
        for K in steps
    ]


def test_flow_converges_at_order_one(rng):
    """The activation stages are exact ("augmented", cheaper to compile than
    "exact"), so the error is that of the Euler blocks of the linear stages."""
    net = _rank_deficient_net(rng, jnp.tanh)
    xs = _inputs(rng, 4, 64)
    errors = _flow_errors(net, xs, STEPS, activation="augmented")
    order = fitted_order(STEPS, errors)
    print("tanh, linear='flow':", [f"{e:.3g}" for e in errors], f"order {order:.3f}")
    assert 0.9 <= order <= 1.1, (order, errors)
    assert errors[-1] < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["linear", "smooth"])
@pytest.mark.parametrize("sigma", [jax.nn.relu, jax.nn.sigmoid])
def test_flow_converges_at_order_one_more_nets(rng, scaling, sigma):
    """Over 8..256 the fit is 1.03-1.2 (the error at K = 8 is pre-asymptotic:
    rotations by angles near pi grow like exp(theta^2 / 2K)); from 32 on, 1.0."""
    net = _rank_deficient_net(rng, sigma)
    xs = _inputs(rng, 4, 64)
    errors = _flow_errors(net, xs, STEPS, time_scaling=scaling)
    order = fitted_order(STEPS[2:], errors[2:])
    print(sigma, scaling, [f"{e:.3g}" for e in errors], f"order {order:.3f}")
    assert 0.9 <= order <= 1.1, (order, errors)


def _stretch_stages(refined):
    return [s for s in refined.chain.stages if isinstance(s, StretchStage)]


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_stretch_stage_is_stable_at_every_step_count(rng, num_steps):
    """kappa = 30: explicit Euler multiplies a null direction by (1 - 30/K)^K
    (29 at K = 1); the implicit step by (1 + 30/K)^-K < 1."""
    net = _rank_deficient_net(rng, jnp.tanh)
    kappa = 30.0
    refined = refine(net, num_steps, linear="flow", kappa=kappa)
    for stage in _stretch_stages(refined):
        null = np.asarray(stage.lam) == -kappa
        assert null.any()
        factor = np.prod(1 + np.asarray(stage.untie().blocks.d), axis=0)
        assert np.all(np.abs(factor[null]) < 1)
        np.testing.assert_allclose(
            factor[null], (1 + kappa / num_steps) ** -num_steps, rtol=1e-12
        )
    explicit = refine(net, num_steps, linear="flow", kappa=kappa, stretch="explicit")
    for stage in _stretch_stages(explicit):
        null = np.asarray(stage.lam) == -kappa
        factor = np.prod(1 + np.asarray(stage.untie().blocks.d), axis=0)
        assert np.all(np.abs(factor[null]) > 20)  # |1 - 30/K|^K for K <= 4
    xs = _inputs(rng, 4, 32)
    plain = np.max(np.abs(_apply(net, xs)))
    # Euler with one to four steps per rotation is crude, but nothing blows up.
    assert refinement_error(net, refined, xs) < 10 * (1 + plain)


def test_exact_stretch_leaves_only_the_rotation_error(rng):
    net = _rank_deficient_net(rng, jnp.tanh)
    xs = _inputs(rng, 4, 32)
    implicit = _flow_errors(net, xs, [64])[0]
    exact = _flow_errors(net, xs, [64], stretch="exact")[0]
    assert exact < 1.1 * implicit  # the rotations dominate (math.md sec. 6 item 5)


# Smooth activations: "newton", "linearized", "augmented" (sec. 4.4)


Y = jnp.linspace(-6.0, 6.0, 601)[:, None]


@pytest.mark.parametrize("sigma", [jnp.tanh, jax.nn.sigmoid])
def test_newton_error_falls_with_newton_steps(sigma):
    """tanh on |y| <= 6 at K = 64: 0.34, 0.086, 0.020, 1.8e-5 for N = 1, 2, 3, 5."""
    net = _unit_layer(sigma)
    errors = [
        refinement_error(net, refine(net, 64, activation="newton", newton_steps=N), Y)
        for N in (1, 2, 3, 5, 10)
    ]
    print(sigma, "newton N = 1, 2, 3, 5, 10:", [f"{e:.2g}" for e in errors])
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > 0.1 and errors[-1] < 1e-12


@pytest.mark.parametrize(
    "sigma, floor", [(jnp.tanh, 1.5), (jax.nn.sigmoid, 0.5), (jax.nn.softplus, 0.9)]
)
def test_linearized_error_does_not_vanish(sigma, floor):
    """The paper's blocks converge to another flow: on |y| <= 6 with c = 0, tanh
    1.25, 1.72, 1.82 at K = 2, 8, 64 (1.84 at 1024); sigmoid 0.63, softplus 1.15."""
    net = _unit_layer(sigma)
    errors = [
        refinement_error(net, refine(net, K, activation="linearized"), Y)
        for K in (2, 8, 64)
    ]
    print(sigma, "linearized K = 2, 8, 64:", [f"{e:.3g}" for e in errors])
    assert errors[0] < errors[1] < errors[2]
    assert errors[-1] > floor


def test_linearized_reference_point_changes_the_blocks():
    net = _unit_layer(jnp.tanh)
    at_zero = refine(net, 8, activation="linearized")
    at_two = refine(net, 8, activation="linearized", reference_point=2.0)
    near_two = jnp.linspace(1.5, 2.5, 11)[:, None]
    assert refinement_error(net, at_two, near_two) < refinement_error(
        net, at_zero, near_two
    )


@pytest.mark.parametrize("sigma", [jnp.tanh, jax.nn.sigmoid, jax.nn.softplus])
@pytest.mark.parametrize("num_steps", [1, 5, 64])
def test_augmented_blocks_are_exact(sigma, num_steps):
    net = _unit_layer(sigma)
    refined = refine(net, num_steps, activation="augmented")
    assert refinement_error(net, refined, Y) <= 1e-12
    (stage,) = [s for s in refined.chain.stages if isinstance(s, AugmentedStage)]
    assert stage.width_factor == 2 and stage.depth == num_steps


def test_augmented_blocks_in_a_network_float32(rng):
    mlp = _mlp(rng, 5, 3, 16, 2, np.float32, activation=jnp.tanh)
    refined = refine(mlp, 16, activation="augmented")
    xs = _inputs(rng, 5, 32, np.float32)
    plain = _apply(mlp, xs)
    scale = float(jnp.max(jnp.abs(plain)))
    assert refinement_error(mlp, refined, xs) <= 1e-5 * max(1.0, scale)


def test_activation_option_ignored_for_relu_family(rng):
    mlp = _mlp(rng, 3, 2, 6, 2, activation=jax.nn.relu)
    xs = _inputs(rng, 3, 16)
    for mode in ("linearized", "newton", "augmented"):
        refined = refine(mlp, 4, activation=mode)
        assert set(refined.block_counts()) == {"LinearMap", "LeakyReluBlock"}
        with jax.disable_jit():
            np.testing.assert_array_equal(refined(xs[0]), mlp(xs[0]))


# Structure: depth, block counts, parameters, residual blocks


def test_reports_depth_block_counts_and_parameters(rng):
    mlp = _mlp(rng, 3, 2, 6, 2, activation=jax.nn.relu)
    K = 5
    whole = refine(mlp, K)
    assert whole.depth == 2 * K  # the final identity layer has no activation blocks
    assert whole.block_counts() == {"LinearMap": 3, "LeakyReluBlock": 2 * K}
    assert whole.num_non_residual == 3 and not whole.is_residual
    weights = 6 * 3 + 6 + 6 * 6 + 6 + 2 * 6 + 2
    assert whole.num_params == weights + 2 * K

    flow = refine(mlp, K, linear="flow")
    assert flow.depth == 3 * 4 * K + 2 * K
    counts = flow.block_counts()
    assert counts["LinearBlock"] == 6 * K and counts["DiagonalBlock"] == 3 * K
    assert counts["TranslationBlock"] == 3 * K and counts["LeakyReluBlock"] == 2 * K
    assert flow.num_non_residual == 0 and flow.is_residual


@pytest.mark.parametrize("linear", ["whole", "flow"])
@pytest.mark.parametrize("activation", ["exact", "linearized", "newton", "augmented"])
def test_every_block_is_identity_plus_residual(rng, linear, activation):
    mlp = _mlp(rng, 3, 2, 4, 1, activation=jnp.tanh, final_activation=jax.nn.relu)
    refined = refine(mlp, 3, linear=linear, activation=activation, tied=False)
    y = refined.embed(jnp.asarray(rng.normal(size=3)))
    for stage in refined.chain.stages:
        if isinstance(stage, LinearMap):
            assert not stage.is_residual and stage.depth == 0
            y = stage(y)
            continue
        assert stage.is_residual and stage.depth == 3
        if isinstance(stage, AugmentedStage):
            y = stage(y)
            continue
        for k in range(stage.depth):
            block = stage.block(k)
            y_next = block(y)
            np.testing.assert_array_equal(y_next, y + block.residual(y))
            y = y_next


def test_tied_storage_does_not_grow_with_num_steps(rng):
    net = _rank_deficient_net(rng, jnp.tanh)
    small, large = 8, 64
    tied = [storage_bytes(refine(net, K, linear="flow")) for K in (small, large)]
    untied = [
        storage_bytes(refine(net, K, linear="flow", tied=False)) for K in (small, large)
    ]
    n, layers, stages = refine(net, small, linear="flow").n, 3, 5
    # Tied: per-block scalars only (coefficient and grid point of each stage).
    assert tied[1] - tied[0] <= (large - small) * layers * stages * 2 * 8
    # Untied: every linear block stores its (n, n) weight.
    assert untied[1] - untied[0] >= (large - small) * layers * 2 * n * n * 8


def _velocity_parameters(stage, num_steps):
    """The field parameters of each block, step size divided out, shape (K, -1)."""
    blocks = stage.blocks
    if isinstance(blocks, LinearBlock):
        return num_steps * np.asarray(blocks.W).reshape(num_steps, -1)
    if isinstance(blocks, DiagonalBlock):
        return num_steps * np.asarray(blocks.d)
    if isinstance(blocks, TranslationBlock):
        return num_steps * np.asarray(blocks.b)
    return np.stack([np.asarray(blocks.a), np.asarray(blocks.beta)], axis=1)


def _adjacent_differences(refined, num_steps):
    """Per stage of blocks, the largest change of a parameter from block to block."""
    return [
        np.max(np.abs(np.diff(_velocity_parameters(stage, num_steps), axis=0)))
        for stage in refined.chain.stages
        if isinstance(stage, Stage | ActivationStage)
    ]


def test_adjacent_blocks_differ_by_order_one_over_num_steps(rng):
    """Untied, smooth time scaling, linearized activation blocks: every block's
    parameters (step divided out) change by O(1/K) from one block to the next.
    The implicit stretch weights `lam / (1 - lam / K)` with `lam = -kappa` reach
    this regime only for `K >> kappa` (ratios 0.68, 0.61, 0.57 from K = 32)."""
    net = _rank_deficient_net(rng, jax.nn.sigmoid)
    options = {
        "linear": "flow",
        "tied": False,
        "time_scaling": "smooth",
        "activation": "linearized",
    }
    steps = (256, 512, 1024)
    D = np.array([_adjacent_differences(refine(net, K, **options), K) for K in steps])
    print("max adjacent difference per stage, K = 256, 512, 1024:\n", D)
    assert D.shape[1] == 3 * 4 + 2 and np.all(D > 1e-4)  # last layer: identity
    np.testing.assert_allclose(D[1:] / D[:-1], 0.5, atol=0.05)


def test_relu_weights_are_smooth_except_near_the_end():
    """alpha_k K = 1 / (1 - k/K): O(1/K) steps on s <= 1/2; the field is singular
    at s = 1 (eq. 47), so the last weights jump (from 1/2 to 1)."""
    D = []
    for K in (32, 64, 128):
        alpha = K * relu_family_weights(homotopy_grid(K, TimeScaling("linear")), 0.0)
        D.append(np.max(np.abs(np.diff(alpha[: K // 2]))))
    np.testing.assert_allclose(np.array(D[1:]) / np.array(D[:-1]), 0.5, atol=0.05)


# Cases 05, 06, 08, 10 of ../shared/cases


def test_case05_negative_determinant_is_padded(rng):
    W = np.load("tests/cases/case05_negative_det_weight.npy")
    net = sequential([W], [np.zeros(3)], [jnp.tanh])
    xs = _inputs(rng, 3, 16)
    assert refinement_error(net, refine(net, 2), xs) <= 1e-12
    errors = _flow_errors(net, xs, [64, 128])
    assert refine(net, 2, linear="flow").n == 4
    # A rotation by pi in the padded space: order one, 0.19 and 0.095 (sec. 3.3).
    assert 0.4 < errors[1] / errors[0] < 0.6 and errors[1] < 0.15


@pytest.mark.parametrize("key", ["rank1_diag", "rank1_dense"])
def test_case06_singular_weights_work(rng, key):
    W = as_array(load_case("case06_singular_and_nan_weights.json")[key])
    net = sequential([W], [np.array([0.3, -0.2])], [jax.nn.relu])
    xs = _inputs(rng, 2, 16)
    assert refinement_error(net, refine(net, 3), xs) <= 1e-15
    errors = _flow_errors(net, xs, [64, 128])
    # rank1_diag needs no rotation: its only error is exp(-kappa)-small.
    assert errors[1] < max(0.6 * errors[0], 1e-12) and errors[1] < 0.1


def test_case06_nan_weight_is_refused():
    W = as_array(load_case("case06_singular_and_nan_weights.json")["with_nan"])
    net = sequential([np.eye(2), W], [np.zeros(2), np.zeros(2)], [jnp.tanh, None])
    for linear in ("whole", "flow"):
        with pytest.raises(ValueError, match="layer 1 has a non-finite W"):
            refine(net, 4, linear=linear)


def _count_equations(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            count += _count_equations(sub)
    return count


def _case08(num_steps, linear):
    key = jax.random.key(8)
    mlp = eqx.nn.MLP(16, 1, 16, 2, key=key)
    return refine(mlp, num_steps, linear=linear)


def _compile_seconds(refined, batch):
    xs = jnp.ones((batch, 16))
    fresh = jax.jit(lambda m, x: jax.vmap(m)(x))
    start = time.perf_counter()
    fresh.lower(refined, xs).compile()
    return time.perf_counter() - start


@pytest.mark.parametrize("linear", ["whole", "flow"])
def test_case08_program_size_and_compile_time_do_not_grow(linear):
    small, large = _case08(10, linear), _case08(1000, linear)
    x = jnp.ones(16)
    jaxprs = [jax.make_jaxpr(lambda m, x: m(x))(r, x).jaxpr for r in (small, large)]
    sizes = [_count_equations(j) for j in jaxprs]
    assert sizes[0] == sizes[1]
    texts = [re.sub(r"\s+", " ", re.sub(r"\d+", "N", str(j))) for j in jaxprs]
    assert texts[0] == texts[1]
    # Fresh shapes each time, so no compilation is served from a cache.
    t_small = min(_compile_seconds(small, 3 + i) for i in range(3))
    t_large = min(_compile_seconds(large, 13 + i) for i in range(3))
    print(f"case 08 ({linear}): compile 10 steps {t_small:.3f}s, 1000 {t_large:.3f}s")
    assert t_large <= 3 * t_small


def test_case10_softmax_refused_tanh_final_exact(rng):
    key = jax.random.key(10)
    softmax = eqx.nn.MLP(4, 3, 8, 2, final_activation=jax.nn.softmax, key=key)
    for linear in ("whole", "flow"):
        with pytest.raises(ValueError, match="softmax"):
            refine(softmax, 4, linear=linear)
    for dtype in (np.float32, np.float64):
        mlp = _mlp(rng, 4, 3, 8, 2, dtype, final_activation=jax.nn.tanh)
        xs = _inputs(rng, 4, 64, dtype)
        assert refinement_error(mlp, refine(mlp, 8), xs) <= 1e-6


# Bad input


class _Custom(eqx.Module):
    def __call__(self, x):
        return 2 * x


@pytest.mark.parametrize(
    "layer, name",
    [
        (eqx.nn.Dropout(0.5), "Dropout"),
        (eqx.nn.LayerNorm(4), "LayerNorm"),
        (eqx.nn.Conv1d(1, 1, 3, key=jax.random.key(0)), "Conv1d"),
        (_Custom(), "_Custom"),
    ],
)
def test_unsupported_layers_are_named(layer, name):
    linear = eqx.nn.Linear(4, 4, key=jax.random.key(1))
    net = eqx.nn.Sequential([linear, layer])
    for option in ("whole", "flow"):
        with pytest.raises(TypeError, match=name):
            refine(net, 4, linear=option)


@pytest.mark.parametrize("sigma, name", [(jax.nn.gelu, "gelu"), (jax.nn.silu, "silu")])
def test_refused_activations_are_named(sigma, name):
    mlp = eqx.nn.MLP(3, 2, 4, 2, activation=sigma, key=jax.random.key(0))
    with pytest.raises(ValueError, match=name):
        refine(mlp, 4)


@pytest.mark.parametrize(
    "num_steps, error, shown",
    [
        (0, ValueError, "got 0"),
        (-3, ValueError, "got -3"),
        (2.0, TypeError, "got 2.0"),
        (np.float64(3.0), TypeError, "3.0"),
        (True, TypeError, "got True"),
        ("8", TypeError, "got '8'"),
        (None, TypeError, "got None"),
    ],
)
def test_bad_num_steps_are_named(num_steps, error, shown):
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(error, match=re.escape(shown)):
        refine(mlp, num_steps)


def test_numpy_integer_steps_are_accepted(rng):
    mlp = _mlp(rng, 3, 2, 4, 1)
    assert refine(mlp, np.int64(3)).num_steps == 3


@pytest.mark.parametrize(
    "options, error, shown",
    [
        ({"linear": "both"}, ValueError, "linear='both'"),
        ({"activation": "newtonian"}, ValueError, "activation='newtonian'"),
        ({"stretch": "implicitly"}, ValueError, "stretch='implicitly'"),
        ({"newton_steps": 3}, ValueError, "newton_steps=3"),
        ({"activation": "newton", "newton_steps": 0}, ValueError, "got 0"),
        ({"activation": "newton", "newton_steps": 1.5}, TypeError, "got 1.5"),
        ({"time_scaling": "quadratic"}, ValueError, "quadratic"),
        ({"tied": "yes"}, TypeError, "tied"),
        ({"reference_point": "zero"}, TypeError, "reference_point"),
        ({"linear": "flow", "kappa": -1.0}, ValueError, "kappa"),
        ({"linear": "flow", "n": 2}, ValueError, "n=2"),
        ({"n": 2}, ValueError, "n=2"),
    ],
)
def test_bad_options_are_named(options, error, shown):
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(error, match=re.escape(shown)):
        refine(mlp, 4, **options)


def test_wrong_input_shape_is_named(rng):
    refined = refine(_mlp(rng, 3, 2, 4, 1), 2)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        refined(jnp.ones(4))


# vmap, jit, serialisation


@pytest.mark.parametrize(
    "linear", ["whole", pytest.param("flow", marks=pytest.mark.slow)]
)
def test_stack_of_mlps_refines_to_stack_of_resnets(linear):
    keys = jax.random.split(jax.random.key(3), 4)

    def make(key):
        return eqx.nn.MLP(3, 2, 5, 2, activation=jnp.tanh, key=key)

    stack = eqx.filter_vmap(lambda m: refine(m, 8, linear=linear))(
        eqx.filter_vmap(make)(keys)
    )
    xs = jax.random.normal(jax.random.key(4), (4, 3))
    got = eqx.filter_vmap(lambda r, x: r(x))(stack, xs)
    # Under vmap the ambient dimension is chosen conservatively: use the same.
    n = stack.n
    each = eqx.filter_jit(lambda k, x: _call(refine(make(k), 8, linear=linear, n=n), x))
    want = jnp.stack([each(k, x) for k, x in zip(keys, xs, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert stack.depth == (2 if linear == "whole" else 2 + 3 * 4) * 8


@pytest.mark.parametrize(
    "linear", ["whole", pytest.param("flow", marks=pytest.mark.slow)]
)
def test_jit_refine_and_forward(rng, linear):
    mlp = _mlp(rng, 3, 2, 5, 2, activation=jax.nn.sigmoid)
    xs = _inputs(rng, 3, 8)
    refined = eqx.filter_jit(lambda m: refine(m, 6, linear=linear))(mlp)
    eager = refine(mlp, 6, linear=linear, n=refined.n)
    np.testing.assert_allclose(_call(refined, xs[0]), _call(eager, xs[0]), rtol=1e-12)
    np.testing.assert_allclose(_apply(refined, xs), _apply(eager, xs), rtol=1e-12)


def test_gradient_through_the_refined_net(rng):
    """Untied blocks train: gradients exist for every linear block's weight."""
    mlp = _mlp(rng, 3, 2, 4, 1, activation=jnp.tanh)
    refined = refine(mlp, 4, linear="flow", tied=False)
    xs = _inputs(rng, 3, 8)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(xs) ** 2))(refined)
    linear_grads = [
        s.blocks.W for s in grads.chain.stages if isinstance(s.blocks, LinearBlock)
    ]
    assert linear_grads and all(np.all(np.isfinite(g)) for g in linear_grads)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"linear": "flow"},
        {"linear": "flow", "tied": False},
        {"activation": "augmented"},
        {"activation": "linearized", "time_scaling": "smooth"},
    ],
)
def test_serialisation_round_trip(rng, options):
    """Write the leaves, read them into a skeleton built by `eval_shape` (as a model
    file reader does). Depth 1: no square layer, so the traced weights get the
    same ambient dimension as the concrete ones."""
    mlp = _mlp(rng, 3, 2, 5, 1, activation=jnp.tanh)
    refined = refine(mlp, 4, **options)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, refined)
    buffer.seek(0)
    like = eqx.filter_eval_shape(
        lambda m: refine(m, 4, **options),
        _mlp(rng, 3, 2, 5, 1, activation=jnp.tanh),
    )
    loaded = eqx.tree_deserialise_leaves(buffer, like)
    assert isinstance(loaded, RefinedNet)
    xs = _inputs(rng, 3, 4)
    np.testing.assert_array_equal(_apply(loaded, xs), _apply(refined, xs))


def test_integer_input_is_promoted():
    """An integer input is read as the weights' float dtype, never truncated."""
    mlp = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0), dtype=jnp.float32)
    x = jnp.array([1, 2, -1, 3], jnp.int32)
    out = refine(mlp, 2)(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, mlp(x.astype(jnp.float32)), atol=1e-6)


def test_whole_checks_kappa():
    mlp = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="kappa"):
        refine(mlp, 2, kappa=0.0)
