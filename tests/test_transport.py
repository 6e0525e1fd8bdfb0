"""Characteristics and the transport equation (eq. 1-6) against independent oracles."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

import flowjax


TIGHT = flowjax.Integrator(
    stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12), max_steps=100_000
)


def linear_field(t, x, A):
    del t
    return A @ x


def terminal(y):
    return jnp.sin(y[0]) + y[1] ** 2 - 0.5 * y[2]


def test_linear_field_closed_form(rng):
    """u(x, t) = f(expm((t1 - t) A) x) for v(x) = A x (eq. 5)."""
    A = rng.normal(size=(3, 3))
    x = rng.normal(size=3)
    for t in (0.0, 0.4, 1.0):
        u = flowjax.solve_transport(
            terminal,
            linear_field,
            jnp.asarray(x),
            t,
            1.0,
            jnp.asarray(A),
            integrator=TIGHT,
        )
        expected = terminal(jnp.asarray(scipy.linalg.expm((1.0 - t) * A) @ x))
        np.testing.assert_allclose(u, expected, rtol=1e-8, atol=1e-9)


def test_flow_map_backward_inverts_forward(rng):
    A = rng.normal(size=(3, 3))
    x = jnp.asarray(rng.normal(size=3))
    forward = flowjax.flow_map(
        linear_field, x, 0.0, 0.7, jnp.asarray(A), integrator=TIGHT
    )
    back = flowjax.flow_map(
        linear_field, forward, 0.7, 0.0, jnp.asarray(A), integrator=TIGHT
    )
    np.testing.assert_allclose(back, x, atol=1e-9)


def rotating_field(t, x, args):
    """A smooth, nonlinear, time-dependent field in the plane."""
    del args
    return jnp.stack([jnp.sin(x[1]) + 0.3 * t, 0.5 * jnp.cos(x[0]) - 0.2 * x[1]])


def gaussian(y):
    return jnp.exp(-jnp.sum((y - jnp.array([0.3, -0.2])) ** 2))


def semi_lagrangian(t, t1, num_steps, grid):
    """Solve u_t + v . grad u = 0 backwards from u(., t1) = f on a grid.

    An independent method written with NumPy and SciPy only: u(x, t_k) =
    u(x + dt v_mid, t_{k+1}), with the foot of the characteristic found by the
    midpoint rule and u read off by cubic spline interpolation.
    """
    h = grid[1] - grid[0]
    X, Y = np.meshgrid(grid, grid, indexing="ij")
    u = np.exp(-((X - 0.3) ** 2 + (Y + 0.2) ** 2))

    def v(X, Y, t):
        return np.sin(Y) + 0.3 * t, 0.5 * np.cos(X) - 0.2 * Y

    dt = (t1 - t) / num_steps
    for k in reversed(range(num_steps)):
        tk = t + k * dt
        vx, vy = v(X, Y, tk)
        mx, my = v(X + 0.5 * dt * vx, Y + 0.5 * dt * vy, tk + 0.5 * dt)
        feet = np.stack([X + dt * mx - grid[0], Y + dt * my - grid[0]]) / h
        u = scipy.ndimage.map_coordinates(u, feet, order=3, mode="nearest")

    def at(points):
        return scipy.ndimage.map_coordinates(u, (points.T - grid[0]) / h, order=3)

    return at


def test_agrees_with_a_grid_method():
    grid = np.linspace(-4.0, 4.0, 161)
    u_grid = semi_lagrangian(0.0, 1.0, 40, grid)
    points = np.array([[0.0, 0.0], [0.5, -0.5], [-0.4, 0.3], [1.0, 0.2]])
    expected = u_grid(points)
    for p, u_p in zip(points, expected, strict=True):
        u = flowjax.solve_transport(gaussian, rotating_field, jnp.asarray(p), 0.0, 1.0)
        np.testing.assert_allclose(u, u_p, atol=2e-4)


def test_gradient_matches_finite_differences(rng):
    A = jnp.asarray(rng.normal(size=(3, 3)))
    x = jnp.asarray(rng.normal(size=3))

    def u(x, A):
        return flowjax.solve_transport(
            terminal, linear_field, x, 0.0, 1.0, A, integrator=TIGHT
        )

    gx, gA = jax.grad(u, argnums=(0, 1))(x, A)
    eps = 1e-6
    for i in range(3):
        e = jnp.zeros(3).at[i].set(eps)
        fd = (u(x + e, A) - u(x - e, A)) / (2 * eps)
        np.testing.assert_allclose(gx[i], fd, rtol=1e-6, atol=1e-8)
    E = jnp.zeros((3, 3)).at[1, 2].set(eps)
    fd = (u(x, A + E) - u(x, A - E)) / (2 * eps)
    np.testing.assert_allclose(gA[1, 2], fd, rtol=1e-6, atol=1e-8)


def test_vmap_matches_loop(rng):
    xs = jnp.asarray(rng.normal(size=(5, 2)))

    def u(x):
        return flowjax.solve_transport(gaussian, rotating_field, x, 0.0, 1.0)

    np.testing.assert_allclose(
        jax.jit(jax.vmap(u))(xs), jnp.stack([u(x) for x in xs]), rtol=1e-10
    )


def test_saveat_and_solver_pass_through(rng):
    x = jnp.asarray(rng.normal(size=2))
    ts = jnp.linspace(0.0, 1.0, 5)
    sol = flowjax.characteristics(
        rotating_field,
        x,
        0.0,
        1.0,
        saveat=diffrax.SaveAt(ts=ts),
        integrator=flowjax.Integrator(solver=diffrax.Dopri5()),
    )
    assert sol.ys is not None and sol.ys.shape == (5, 2)
    np.testing.assert_allclose(sol.ys[0], x)


def test_time_after_terminal_time_refused():
    with pytest.raises(ValueError, match="t <= t1"):
        flowjax.solve_transport(gaussian, rotating_field, jnp.zeros(2), 1.5, 1.0)


def test_max_steps_is_reported():
    integrator = flowjax.Integrator(max_steps=2)
    with pytest.raises(Exception, match="max_steps=2"):
        flowjax.flow_map(rotating_field, jnp.ones(2), 0.0, 10.0, integrator=integrator)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_start_point_is_named_not_max_steps(bad):
    x = jnp.ones(2).at[1].set(bad)

    def characteristics(x):
        return flowjax.characteristics(rotating_field, x, 0.0, 1.0).ys

    calls = [
        ("flow_map", lambda x: flowjax.flow_map(rotating_field, x, 0.0, 1.0)),
        ("characteristics", characteristics),
        ("flow_map", lambda x: flowjax.flow_map(rotating_field, x, 0.5, 0.5)),
        (  # solve_transport carries x with flow_map
            "flow_map",
            lambda x: flowjax.solve_transport(gaussian, rotating_field, x, 0.0, 1.0),
        ),
    ]
    for where, call in calls:
        for f in (call, jax.jit(call)):
            with pytest.raises(Exception, match=f"{where}: the start point x contains"):
                f(x)
    with pytest.raises(Exception, match="NaN or inf") as err:
        jax.jit(jax.vmap(characteristics))(jnp.stack([jnp.ones(2), x]))
    assert "reached max_steps" not in str(err.value)


@pytest.mark.parametrize("scaling", ["linear", "smooth", "cubic"])
@pytest.mark.parametrize("name", ["relu", "relu6", "tanh"])
def test_activation_stage_float32_reaches_its_end(scaling, name):
    """Oracle: each point moves on a straight line, z(s) = sigma_tau(s)(z0) (eq. 42).

    The "linear" ReLU field is singular at s = 1; a float32 solve to s = 1 used to
    stop at max_steps.
    """
    sigma = flowjax.activation(name)
    args = (sigma, flowjax.time_scaling(scaling))
    z0 = jnp.asarray([-1.5, -0.3, 0.0, 0.7, 2.0, 7.0], jnp.float32)
    zero, half, one = (jnp.float32(s) for s in (0.0, 0.5, 1.0))  # a float32 solve

    def flow(z, t0, t1):
        return flowjax.flow_map(flowjax.activation_field, z, t0, t1, args)

    z1 = jax.jit(lambda z: flow(z, zero, one))(z0)
    assert z1.dtype == jnp.float32
    np.testing.assert_allclose(z1, sigma(z0), atol=2e-5)
    # Part of the way: only the solve, no closing step.
    half = flow(z0, zero, half)
    assert half.dtype == jnp.float32
    tau = float(args[1].tau(0.5))
    expected = flowjax.sigma_s(sigma, z0, tau)
    np.testing.assert_allclose(half, expected, atol=2e-5)


def test_activation_stage_from_past_the_cut():
    sigma, scaling = flowjax.activation("relu"), flowjax.time_scaling("linear")
    y = jnp.asarray([-2.0, -0.1, 0.5, 3.0])
    s0 = 1 - 1e-4  # past tau = 1 - 1e-3: no solve, the exact closing only
    z0 = flowjax.sigma_s(sigma, y, s0)
    z1 = flowjax.flow_map(flowjax.activation_field, z0, s0, 1.0, (sigma, scaling))
    np.testing.assert_allclose(z1, jax.nn.relu(y), atol=1e-12)
