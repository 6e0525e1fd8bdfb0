import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.integrate

from flowjax._neural_flow import NeuralFlow, flow_to_resnet, resnet_to_flow
from flowjax._resnet import EulerResNet
from flowjax._two_layer import GridParams, TwoLayerField, TwoLayerParams, uniform_grid


TIGHT = diffrax.PIDController(rtol=1e-10, atol=1e-12)


def _random_stack(rng, n, m, K, scale=1.0, dtype=np.float64):
    return TwoLayerParams(
        jnp.asarray(rng.normal(size=(K, m, n)), dtype),
        jnp.asarray(rng.normal(size=(K, m)), dtype),
        jnp.asarray(scale * rng.normal(size=(K, n, m)) / np.sqrt(m), dtype),
        jnp.asarray(scale * rng.normal(size=(K, n)), dtype),
    )


def _two_blocks(rng, n, m):
    stack = _random_stack(rng, n, m, 2)
    first = jtu.tree_map(lambda a: a[0], stack)
    second = jtu.tree_map(lambda a: a[1], stack)
    return first, second


def _random_resnet(rng, n=3, m=6, K=8, T=1.0):
    stack = _random_stack(rng, n, m, K)
    return EulerResNet(TwoLayerField(jnp.tanh), stack, uniform_grid(K, 0.0, T))


def _smooth_resnet(rng, n=3, m=6, K=16):
    """Blocks sampled from parameters smooth in time (as in a trained ResNet)."""
    P0, P1 = _two_blocks(rng, n, m)
    ts = uniform_grid(K)
    s = jnp.sin(3 * ts[:-1])
    stack = jtu.tree_map(lambda a, b: a + s.reshape(-1, *[1] * a.ndim) * b, P0, P1)
    return EulerResNet(TwoLayerField(jnp.tanh), stack, ts)


def _numpy_field(params_of_t):
    def rhs(t, y):
        W1, b1, W2, b2 = params_of_t(t)
        return W2 @ np.tanh(W1 @ y + b1) + b2

    return rhs


def _solve_ivp(rhs, t0, t1, y0):
    sol = scipy.integrate.solve_ivp(
        rhs, (t0, t1), y0, method="DOP853", rtol=1e-12, atol=1e-13
    )
    assert sol.success
    return sol.y[:, -1]


# ResNet <-> flow


def test_euler_on_constant_grid_reproduces_resnet_bitwise(rng):
    resnet = _random_resnet(rng, K=9, T=2.0)
    flow = resnet_to_flow(resnet, "constant")
    euler = NeuralFlow(
        flow.field,
        flow.params,
        flow.t0,
        flow.t1,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.StepTo(resnet.ts),
    )
    y0 = jnp.asarray(rng.normal(size=3))
    np.testing.assert_array_equal(euler(y0), resnet(y0))


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_round_trip_is_identical(rng, interpolation):
    resnet = _random_resnet(rng, K=7)
    flow = resnet_to_flow(resnet, interpolation)
    for back in (flow_to_resnet(flow, 7), flow_to_resnet(flow, ts=resnet.ts)):
        np.testing.assert_array_equal(back.ts, resnet.ts)
        for a, b in zip(
            jtu.tree_leaves(back.params), jtu.tree_leaves(resnet.params), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        y0 = jnp.asarray(rng.normal(size=3))
        np.testing.assert_array_equal(back(y0), resnet(y0))


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_refined_resnet_stays_within_euler_error(rng, interpolation):
    N = 16
    resnet = _smooth_resnet(rng, K=N)
    flow = resnet_to_flow(resnet, interpolation, rtol=1e-11, atol=1e-12)
    Y0 = jnp.asarray(rng.normal(size=(8, 3)))
    y_flow = jax.vmap(lambda y: flow(y))(Y0)
    errors = {}
    for K in (N, 2 * N, 4 * N):
        y = jax.vmap(flow_to_resnet(flow, K).__call__)(Y0)
        errors[K] = float(jnp.max(jnp.linalg.norm(y - y_flow, axis=1)))
    print(interpolation, errors)
    assert errors[2 * N] <= errors[N]
    # First order: doubling the blocks halves the error.
    assert 0.4 <= errors[2 * N] / errors[N] <= 0.6
    assert 0.4 <= errors[4 * N] / errors[2 * N] <= 0.6


def test_coarsen(rng):
    resnet = _random_resnet(rng, K=8)
    coarse = flow_to_resnet(resnet_to_flow(resnet, "linear"), 4)
    assert coarse.depth == 4
    np.testing.assert_array_equal(coarse.params.W1, resnet.params.W1[::2])


def test_fixed_params_flow(rng):
    """Parameters constant in time: an autonomous flow; its ResNet repeats them."""
    params = jtu.tree_map(lambda a: a[0], _random_stack(rng, 3, 4, 1))
    flow = NeuralFlow(TwoLayerField(jnp.tanh), params, stepsize_controller=TIGHT)
    resnet = flow_to_resnet(flow, 5)
    assert resnet.params.W1.shape == (5, 4, 3)
    y0 = rng.normal(size=3)
    want = _solve_ivp(_numpy_field(lambda t: jtu.tree_leaves(params)), 0.0, 1.0, y0)
    np.testing.assert_allclose(flow(jnp.asarray(y0)), want, atol=1e-7)


def test_conversion_bad_inputs(rng):
    resnet = _random_resnet(rng, K=4)
    flow = resnet_to_flow(resnet)
    with pytest.raises(ValueError, match="num_steps or ts"):
        flow_to_resnet(flow)
    with pytest.raises(ValueError, match=">= 1"):
        flow_to_resnet(flow, 0)
    with pytest.raises(TypeError, match="int"):
        flow_to_resnet(flow, 2.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="expected 4"):
        flow_to_resnet(flow, 3, ts=uniform_grid(4))
    with pytest.raises(ValueError, match="not both"):
        resnet_to_flow(resnet, rtol=1e-3, stepsize_controller=TIGHT)
    with pytest.raises(ValueError, match="no per-block parameters"):
        resnet_to_flow(EulerResNet(lambda t, y, a: y, None, uniform_grid(3)))


# Adaptive solve


def test_adaptive_solve_matches_scipy_smooth_field(rng):
    """Parameters smooth in time, given as a plain function of t."""
    P0, P1 = _two_blocks(rng, 4, 6)

    def params_of_t(t):
        s = jnp.sin(2 * t)
        return jtu.tree_map(lambda a, b: a + s * b, P0, P1)

    def numpy_params(t):
        pairs = zip(jtu.tree_leaves(P0), jtu.tree_leaves(P1), strict=True)
        return [np.asarray(a) + np.sin(2 * t) * np.asarray(b) for a, b in pairs]

    flow = NeuralFlow(
        TwoLayerField(jnp.tanh), params_of_t, 0.0, 1.5, stepsize_controller=TIGHT
    )
    y0 = rng.normal(size=4)
    want = _solve_ivp(_numpy_field(numpy_params), 0.0, 1.5, y0)
    np.testing.assert_allclose(flow(jnp.asarray(y0)), want, atol=1e-7, rtol=0)


def test_adaptive_solve_matches_scipy_on_grid(rng):
    """Linear interpolation on a grid: SciPy solves it interval by interval."""
    resnet = _random_resnet(rng, n=3, K=5, T=2.0)
    flow = resnet_to_flow(resnet, "linear", rtol=1e-10, atol=1e-12)
    ts = np.asarray(resnet.ts)
    stack = [np.asarray(a) for a in jtu.tree_leaves(resnet.params)]
    last = len(ts) - 2

    def piece(k):
        # Block k's value at t_k, block k+1's at t_{k+1}; the last block is held.
        def params_of_t(t):
            w = 0.0 if k == last else (t - ts[k]) / (ts[k + 1] - ts[k])
            return [a[k] + w * (a[min(k + 1, last)] - a[k]) for a in stack]

        return _numpy_field(params_of_t)

    y0 = rng.normal(size=3)
    y = y0
    for k in range(len(ts) - 1):
        y = _solve_ivp(piece(k), ts[k], ts[k + 1], y)
    np.testing.assert_allclose(flow(jnp.asarray(y0)), y, atol=1e-7, rtol=0)


def test_solver_stats_and_defaults(rng):
    resnet = _random_resnet(rng, K=4)
    flow = NeuralFlow(TwoLayerField(jnp.tanh), GridParams(resnet.params, resnet.ts))
    assert isinstance(flow.solver, diffrax.Tsit5)
    assert isinstance(flow.stepsize_controller, diffrax.PIDController)
    sol = flow.solve(jnp.asarray(rng.normal(size=3)))
    assert int(sol.stats["num_steps"]) > 0
    assert sol.ys is not None and sol.ys.shape == (1, 3)


def test_max_steps_raises_clear_error(rng):
    resnet = _random_resnet(rng, K=4)
    flow = resnet_to_flow(resnet, "linear", max_steps=3)
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps=3.*larger max_steps"):
        flow(jnp.ones(3))
    with pytest.raises(eqx.EquinoxRuntimeError, match="looser rtol"):
        eqx.filter_jit(lambda f, y: f(y))(flow, jnp.ones(3))


def test_nonfinite_field_raises(rng):
    flow = NeuralFlow(lambda t, y, a: y / 0.0 * 0.0, None)
    with pytest.raises(eqx.EquinoxRuntimeError, match="NeuralFlow: the adaptive solve"):
        flow(jnp.ones(2))


def test_flow_float32(rng):
    stack = _random_stack(rng, 3, 4, 4, dtype=np.float32)
    resnet = EulerResNet(TwoLayerField(jnp.tanh), stack)
    flow = resnet_to_flow(resnet, "linear", rtol=1e-5, atol=1e-6)
    y = flow(jnp.ones(3, jnp.float32))
    assert y.dtype == jnp.float32
    assert flow_to_resnet(flow, 6)(jnp.ones(3, jnp.float32)).dtype == jnp.float32


def test_flow_gradient_vs_finite_differences(rng):
    stack = _random_stack(rng, 3, 4, 4)
    ts = uniform_grid(4)
    y0 = jnp.asarray(rng.normal(size=3))

    # Step to the grid's kinks, so that the solve is smooth in the parameters.
    controller = diffrax.ClipStepSizeController(TIGHT, step_ts=ts[1:-1])

    def loss(params, y0):
        grid = GridParams(params, ts, "linear")
        flow = NeuralFlow(TwoLayerField(jnp.tanh), grid, stepsize_controller=controller)
        return jnp.sum(flow(y0) ** 2)

    grad_p, grad_y = jax.grad(loss, argnums=(0, 1))(stack, y0)
    direction = jtu.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), stack)
    dy = jnp.asarray(rng.normal(size=3))
    eps = 1e-4

    def shifted(sign):
        params = jtu.tree_map(lambda p, d: p + sign * eps * d, stack, direction)
        return loss(params, y0 + sign * eps * dy)

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    dot = sum(
        jnp.vdot(g, d)
        for g, d in zip(
            jtu.tree_leaves(grad_p), jtu.tree_leaves(direction), strict=True
        )
    )
    np.testing.assert_allclose(dot + jnp.vdot(grad_y, dy), fd, rtol=1e-6)


def test_flow_vmap_matches_loop(rng):
    resnet = _random_resnet(rng, K=4)
    flow = resnet_to_flow(resnet, "linear", rtol=1e-9, atol=1e-11)
    Y0 = jnp.asarray(rng.normal(size=(4, 3)))
    batched = eqx.filter_jit(jax.vmap(lambda y: flow(y)))(Y0)
    looped = jnp.stack([flow(y) for y in Y0])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12)
