import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

from flowjax._two_layer import (
    GridParams,
    TwoLayerField,
    TwoLayerParams,
    two_layer_velocity,
    uniform_grid,
)


def _random_params(rng, n, m, L=None, dtype=np.float64):
    lead = () if L is None else (L,)
    return TwoLayerParams(
        jnp.asarray(rng.normal(size=(*lead, m, n)), dtype),
        jnp.asarray(rng.normal(size=(*lead, m)), dtype),
        jnp.asarray(rng.normal(size=(*lead, n, m)), dtype),
        jnp.asarray(rng.normal(size=(*lead, n)), dtype),
    )


def _numpy_velocity(p, y, sigma=np.tanh):
    W1, b1, W2, b2 = (np.asarray(a) for a in (p.W1, p.b1, p.W2, p.b2))
    return W2 @ sigma(W1 @ y + b1) + b2


def _leaf(p, name):
    return np.asarray(getattr(p, name))


# TwoLayerParams


def test_params_shapes_and_init():
    p = TwoLayerParams.init(3, 7, key=jr.key(0), num_blocks=5, dtype=jnp.float32)
    assert p.W1.shape == (5, 7, 3) and p.b1.shape == (5, 7)
    assert p.W2.shape == (5, 3, 7) and p.b2.shape == (5, 3)
    assert (p.state_dim, p.hidden_dim, p.batch_shape) == (3, 7, (5,))
    assert all(a.dtype == jnp.float32 for a in (p.W1, p.b1, p.W2, p.b2))
    assert not np.any(np.asarray(p.b2))
    # Small outer weights: the initial velocity is small against the state.
    q = TwoLayerParams.init(4, 64, key=jr.key(1), scale=0.1)
    y = jnp.ones(4)
    assert jnp.linalg.norm(two_layer_velocity(q, y, jnp.tanh)) < 0.5


@pytest.mark.parametrize(
    "shapes",
    [
        [(5, 3), (4,), (3, 5), (3,)],
        [(5, 3), (5,), (5, 3), (3,)],
        [(5, 3), (5,), (3, 5), (5,)],
        [(2, 5, 3), (5,), (2, 3, 5), (2, 3)],
        [(3,), (5,), (3, 5), (3,)],
    ],
)
def test_params_bad_shapes(shapes):
    with pytest.raises(ValueError, match="TwoLayerParams"):
        TwoLayerParams(*(jnp.zeros(s) for s in shapes))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_params_init_bad_sizes(bad):
    with pytest.raises((TypeError, ValueError), match="TwoLayerParams.init"):
        TwoLayerParams.init(bad, 3, key=jr.key(0))


def test_velocity_against_numpy(rng):
    p = _random_params(rng, 4, 6)
    y = rng.normal(size=4)
    got = two_layer_velocity(p, jnp.asarray(y), jnp.tanh)
    np.testing.assert_allclose(got, _numpy_velocity(p, y), rtol=1e-14, atol=1e-14)


def test_velocity_bad_inputs(rng):
    p = _random_params(rng, 4, 6)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        two_layer_velocity(p, jnp.zeros(3), jnp.tanh)
    with pytest.raises(ValueError, match="stack"):
        two_layer_velocity(_random_params(rng, 4, 6, L=2), jnp.zeros(4), jnp.tanh)


def test_velocity_float32():
    p = TwoLayerParams.init(3, 5, key=jr.key(0), dtype=jnp.float32)
    v = TwoLayerField(jax.nn.relu)(0.5, jnp.ones(3, jnp.float32), p)
    assert v.dtype == jnp.float32


# GridParams


def test_grid_constant_values(rng):
    L = 4
    stack = _random_params(rng, 2, 3, L=L)
    ts = np.array([0.0, 0.1, 0.5, 0.6, 1.0])
    grid = GridParams(stack, ts, "constant")
    for k in range(L):
        for t in [ts[k], 0.5 * (ts[k] + ts[k + 1]), np.nextafter(ts[k + 1], -1)]:
            np.testing.assert_array_equal(_leaf(grid(t), "W1"), _leaf(stack, "W1")[k])
    # The closed right end belongs to the last block; outside the grid is clamped.
    for t in [1.0, 3.0]:
        np.testing.assert_array_equal(_leaf(grid(t), "b2"), _leaf(stack, "b2")[-1])
    np.testing.assert_array_equal(_leaf(grid(-2.0), "b2"), _leaf(stack, "b2")[0])


def test_grid_linear_against_numpy_interp(rng):
    # Values at t_0..t_{L-1}, held constant on the last interval and clamped
    # outside: exactly numpy's interp with the values placed at ts[:-1].
    L = 5
    stack = _random_params(rng, 2, 3, L=L)
    ts = np.sort(rng.uniform(0, 2, L + 1))
    grid = GridParams(stack, ts, "linear")
    tq = np.concatenate([rng.uniform(-0.5, 2.5, 40), ts])
    got = np.stack([_leaf(grid(t), "W2") for t in tq])
    W2 = _leaf(stack, "W2").reshape(L, -1)
    want = np.stack([np.interp(tq, ts[:-1], W2[:, j]) for j in range(W2.shape[1])], 1)
    np.testing.assert_allclose(got.reshape(len(tq), -1), want, rtol=1e-13, atol=1e-13)
    # Block values are hit exactly at the grid points.
    for k in range(L):
        np.testing.assert_array_equal(_leaf(grid(ts[k]), "W2"), _leaf(stack, "W2")[k])


def test_grid_linear_is_continuous(rng):
    L = 6
    stack = _random_params(rng, 3, 4, L=L)
    grid = GridParams(stack, uniform_grid(L), "linear")
    const = GridParams(stack, uniform_grid(L), "constant")
    eps = 1e-9
    jumps_lin, jumps_const = [], []
    for t in np.asarray(grid.ts[1:-1]):
        for g, out in ((grid, jumps_lin), (const, jumps_const)):
            a, b = jtu.tree_leaves(g(t - eps)), jtu.tree_leaves(g(t + eps))
            out.append(
                max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
            )
    # Lipschitz in t: jumps of order eps * |p_{k+1} - p_k| / dt.
    assert max(jumps_lin) < 1e-6
    # The piecewise-constant grid does jump (so the check above can fail).
    assert min(jumps_const) > 1e-3


def test_grid_under_jit_and_vmap(rng):
    stack = _random_params(rng, 2, 3, L=3)
    grid = GridParams(stack, None, "linear")
    ts = jnp.linspace(-0.2, 1.2, 9)
    batched = jax.vmap(grid)(ts)
    jitted = eqx.filter_jit(lambda g, t: g(t))
    for i, t in enumerate(ts):
        np.testing.assert_allclose(_leaf(jitted(grid, t), "b1"), batched.b1[i])
    np.testing.assert_allclose(batched.b1[0], stack.b1[0])


def test_grid_keeps_parameter_dtype():
    stack = TwoLayerParams.init(2, 3, key=jr.key(0), num_blocks=3, dtype=jnp.float32)
    grid = GridParams(stack, np.linspace(0.0, 1.0, 4), "linear")
    p = grid(jnp.asarray(0.3, jnp.float64))
    assert p.W1.dtype == jnp.float32


def test_grid_bad_inputs(rng):
    stack = _random_params(rng, 2, 3, L=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        GridParams(stack, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="expected 4"):
        GridParams(stack, [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="interpolation"):
        GridParams(stack, None, "cubic")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="leading"):
        GridParams({"W": jnp.zeros((3, 2)), "b": jnp.zeros(2)})


def test_grid_traced_ts_is_accepted(rng):
    stack = _random_params(rng, 2, 3, L=2)

    @jax.jit
    def at_half(ts):
        return GridParams(stack, ts, "linear")(0.5).b1

    np.testing.assert_allclose(
        at_half(jnp.array([0.0, 1.0, 2.0])), stack.b1[0] / 2 + stack.b1[1] / 2
    )


# TwoLayerField


def test_field_with_grid_callable_and_fixed_params(rng):
    stack = _random_params(rng, 3, 4, L=2)
    grid = GridParams(stack, [0.0, 0.5, 1.0], "constant")
    field = TwoLayerField(jnp.tanh)
    y = rng.normal(size=3)
    one = jtu_index(stack, 1)
    want = _numpy_velocity(one, y)
    for args in (grid, one, lambda t: one):
        np.testing.assert_allclose(field(0.7, jnp.asarray(y), args), want, rtol=1e-14)
    with pytest.raises(TypeError, match="TwoLayerParams"):
        field(0.0, jnp.asarray(y), {"W1": stack.W1})


def test_field_drops_into_odeterm(rng):
    """ODETerm(TwoLayerField) with time-dependent args: one Euler step by hand."""
    stack = _random_params(rng, 3, 4, L=2)
    grid = GridParams(stack, [0.0, 0.5, 1.0], "linear")
    field = TwoLayerField(jnp.tanh)
    y0 = jnp.asarray(rng.normal(size=3))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Euler(), 0.25, 0.35, 0.1, y0, args=grid
    )
    want = np.asarray(y0) + 0.1 * _numpy_velocity(grid(0.25), np.asarray(y0))
    np.testing.assert_allclose(sol.ys[-1], want, rtol=1e-12)  # pyright: ignore


def jtu_index(tree, k):
    return jtu.tree_map(lambda a: a[k], tree)
