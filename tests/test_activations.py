import functools
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from flowjax._activations import (
    Activation,
    activation,
    activation_velocity,
    homotopy_threshold,
    inverse_below_threshold,
    piecewise_linear,
    sigma_s,
    sigma_s_inverse,
)


CASES = Path(__file__).parent / "cases"
PIECEWISE_LINEAR = [
    "identity", "relu", "leaky_relu", "relu6", "hard_tanh", "hard_sigmoid",
    "sparse_sigmoid",
]  # fmt: skip
SMOOTH = [
    "tanh", "sigmoid", "softplus", "elu", "celu", "selu", "log_sigmoid", "soft_sign",
    "sparse_plus", "squareplus",
]  # fmt: skip
ALL = PIECEWISE_LINEAR + SMOOTH
S_VALUES = [0.0, 0.3, 0.9, 0.999]
EPS32 = float(np.finfo(np.float32).eps)


def _case(name):
    with open(CASES / name) as f:
        return json.load(f)


def _y_grid(dtype=jnp.float64):
    far = jnp.array([-1e3, -100.0, -10.0, 10.0, 100.0, 1e3])
    return jnp.concatenate([jnp.linspace(-20.0, 20.0, 401), far]).astype(dtype)


def _slope(act, y, s):
    """`sigma_s'(y) = 1 - s + s sigma'(y)`, in float64."""
    y = jnp.asarray(y, jnp.float64)
    return np.asarray(
        jax.jvp(lambda u: sigma_s(act, u, s), (y,), (jnp.ones_like(y),))[1]
    )


# Round trips


@pytest.mark.parametrize("name", ALL)
def test_inverse_round_trip_float64(name):
    act = activation(name)
    y = _y_grid()
    for s in S_VALUES:
        y_back = sigma_s_inverse(act, sigma_s(act, y, s), s)
        assert y_back.dtype == jnp.float64
        # measured worst 1e-13 (tanh, s = 0.999, y = 10: condition 1/sigma_s' = 1e3)
        np.testing.assert_allclose(y_back, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_inverse_round_trip_float32(name):
    act = activation(name)
    y = _y_grid(jnp.float32)
    y64 = np.asarray(y, np.float64)
    for s in S_VALUES:
        z = sigma_s(act, y, s)
        y_back = sigma_s_inverse(act, z, s)
        assert z.dtype == jnp.float32 and y_back.dtype == jnp.float32
        err = np.abs(np.asarray(y_back, np.float64) - y64)
        if s <= 0.9:  # sigma_s' >= 0.1: well conditioned; measured worst 4e-7
            np.testing.assert_array_less(err, 1e-6 * np.maximum(1.0, np.abs(y64)))
        # Everywhere: the rounding of z = (1 - s) y + s sigma(y) and of sigma itself,
        # times the condition number 1/sigma_s'(y). At s = 0.999 a saturated tanh
        # has sigma_s' = 1e-3, so y = 10 is recovered only to ~6e-4 (measured:
        # relative 6e-5 worst, at most 27x the bound's unit).
        f = np.abs(np.asarray(act(jnp.asarray(y64))))
        scale = np.abs((1 - s) * y64) + s * f + np.abs(np.asarray(z, np.float64))
        np.testing.assert_array_less(
            err, 64 * EPS32 * scale / _slope(act, y64, s) + 1e-30
        )


def test_smooth_inverse_matches_brentq():
    act = activation("tanh")
    for s in [0.3, 0.9, 0.999]:
        for z in [-1.7, -0.4, 0.0, 0.25, 0.9, 1.5]:
            g = lambda y, z=z, s=s: (1 - s) * y + s * np.tanh(y) - z  # noqa: E731
            y_ref = scipy.optimize.brentq(g, -1e4, 1e4, xtol=1e-15, rtol=1e-15)
            y = float(sigma_s_inverse(act, z, s))
            assert abs(y - y_ref) <= 1e-12 * max(1.0, abs(y_ref))


def test_user_piecewise_linear_matches_interpolation():
    # slopes 0.5, 2, 0 around breakpoints -1, 2; sigma(0) = 1
    act = piecewise_linear([-1.0, 2.0], [0.5, 2.0, 0.0], value_at_zero=1.0)
    y = np.linspace(-10, 10, 2001)
    sigma = np.interp(
        y, [-1e4, -1.0, 2.0, 1e4], [-1.0 - 0.5 * (1e4 - 1), -1.0, 5.0, 5.0]
    )
    np.testing.assert_allclose(act(y), sigma, rtol=1e-14, atol=1e-12)
    for s in [0.3, 0.9, 0.999]:
        knots = np.array([-1e4, -1.0, 2.0, 1e4])
        sig_knots = np.interp(knots, y, sigma, left=np.nan, right=np.nan)
        sig_knots[[0, -1]] = [-1.0 - 0.5 * (1e4 - 1), 5.0]
        z_knots = (1 - s) * knots + s * sig_knots
        z = (1 - s) * y + s * sigma
        y_ref = np.interp(z, z_knots, knots)  # an independent inverse
        np.testing.assert_allclose(sigma_s_inverse(act, z, s), y_ref, atol=1e-9)
    assert act == piecewise_linear((-1, 2), (0.5, 2, 0), 1.0)  # compared by value


# Velocities


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_relu_velocity_closed_form(dtype):
    z = jnp.linspace(-5.0, 5.0, 101, dtype=dtype)
    act = activation(jax.nn.relu)
    for s in S_VALUES:
        s_ = jnp.asarray(s, dtype)
        v = activation_velocity(act, z, s_)
        assert v.dtype == dtype
        np.testing.assert_array_equal(v, (jax.nn.relu(z) - z) / (1 - s_))  # eq. 43-47


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("a", [0.0, 0.01, 0.2, 0.5])
def test_leaky_relu_velocity_closed_form(dtype, a):
    z = jnp.linspace(-5.0, 5.0, 101, dtype=dtype)
    act = activation(functools.partial(jax.nn.leaky_relu, negative_slope=a))
    for s in S_VALUES:
        s_ = jnp.asarray(s, dtype)
        v = activation_velocity(act, z, s_)
        closed = jnp.where(z < 0, (a - 1) * z / (1 - s_ * (1 - a)), 0.0)
        # the closed form's 1 - s (1 - a) cancels near s = 1: 4 eps / (1 - s(1 - a))
        rtol = 4 * float(jnp.finfo(dtype).eps) / (1 - s * (1 - a))
        np.testing.assert_allclose(v, closed, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", PIECEWISE_LINEAR)
def test_piecewise_description_matches_function(name):
    # At s = 0, z = y and the velocity is sigma(y) - y from the description alone.
    act = activation(name)
    y = jnp.linspace(-8.0, 8.0, 1601)
    v = activation_velocity(act, y, 0.0)
    np.testing.assert_allclose(v, act.fn(y) - y, rtol=0, atol=4e-15)


@pytest.mark.parametrize("name", ALL)
def test_velocity_is_trajectory_derivative(name):
    # z(s) = sigma_s(y) is a straight line with dz/ds = sigma(y) - y (eq. 40-42).
    act = activation(name)
    y = _y_grid()
    for s in [0.0, 0.3, 0.9, 0.99]:
        z, dz_ds = jax.jvp(lambda s_: sigma_s(act, y, s_), (jnp.asarray(s),), (1.0,))
        v = activation_velocity(act, z, s)
        # error of y times |sigma' - 1| <= 1e-12 max(1, |y|) ... as in the round trip
        np.testing.assert_allclose(v, dz_ds, rtol=0, atol=2e-12 * (1 + 1e3) / (1 - s))


def test_case07_relu_endpoint_by_euler():
    case = _case("case07_relu_homotopy_endpoint.json")
    relu = activation(jax.nn.relu)
    for dtype in (jnp.float64, jnp.float32):
        z = jnp.asarray(case["y"], dtype)
        for k in range(
            8
        ):  # z += (1/8) v(z, k/8): exact on the uniform grid (eq. 56-58)
            z = z + (1 / 8) * activation_velocity(relu, z, jnp.asarray(k / 8, dtype))
        assert z.dtype == dtype
        np.testing.assert_array_equal(z, case["expected"])
        np.testing.assert_array_equal(
            z, case["measured_diffrax_0_7_2"]["euler_8_steps"]
        )


# Derivatives


@pytest.mark.parametrize(
    "name", ["tanh", "sigmoid", "softplus", "elu", "relu", "relu6"]
)
def test_inverse_gradients_match_finite_differences(name):
    act = activation(name)
    inverse = jax.jit(lambda z_, s_: sigma_s_inverse(act, z_, s_))
    velocity = jax.jit(lambda z_, s_: activation_velocity(act, z_, s_))
    d_dz = jax.jit(jax.vmap(jax.grad(inverse), (0, None)))
    d_ds = jax.jit(jax.vmap(jax.grad(inverse, argnums=1), (0, None)))
    dv_dz = jax.jit(jax.vmap(jax.grad(velocity), (0, None)))
    # z away from the kinks of relu/relu6 (sigma_s(0) = 0, sigma_s(6) = 6)
    z = jnp.array([-3.1, -0.7, 0.45, 1.3, 4.2, 7.5])
    h = 1e-6  # finite-difference noise: eps |y| / h ~ 2e-9
    for s in [0.2, 0.7, 0.95]:
        s_ = jnp.asarray(s)
        fd_z = (inverse(z + h, s_) - inverse(z - h, s_)) / (2 * h)
        np.testing.assert_allclose(d_dz(z, s_), fd_z, rtol=1e-7, atol=2e-9)
        fd_s = (inverse(z, s_ + h) - inverse(z, s_ - h)) / (2 * h)
        np.testing.assert_allclose(d_ds(z, s_), fd_s, rtol=1e-7, atol=2e-9)
        # the velocity too: it is sigma(y) - y through the inverse
        fd_v = (velocity(z + h, s_) - velocity(z - h, s_)) / (2 * h)
        np.testing.assert_allclose(dv_dz(z, s_), fd_v, rtol=1e-6, atol=2e-9)


@pytest.mark.parametrize("name", ["relu", "relu6", "hard_tanh", "tanh"])
@pytest.mark.parametrize("f", [sigma_s_inverse, activation_velocity])
def test_no_nan_at_kinks_and_at_s_one(name, f):
    act = activation(name)
    g = jax.jit(lambda z_, s_: f(act, z_, s_))
    grads = jax.jit(jax.vmap(jax.grad(g, argnums=(0, 1)), (0, None)))
    z = jnp.array([-2.0, -1.0, 0.0, 1.0, 6.0, 7.0])  # includes every knot
    for s in [0.0, 0.5, 1 - 1e-12, 1.0]:
        s_ = jnp.asarray(s)
        assert bool(jnp.all(jnp.isfinite(g(z, s_))))
        if s < 1:  # at s = 1 a flat piece has no inverse (documented)
            gz, gs = grads(z, s_)
            assert bool(jnp.all(jnp.isfinite(gz))) and bool(jnp.all(jnp.isfinite(gs)))


def test_nan_and_inf_inputs_do_not_hang():
    act = activation("tanh")
    y = sigma_s_inverse(act, jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5]), 0.5)
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf and np.isfinite(y[3])


# Transformations and dtypes


@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_jit_and_vmap_match_eager(name):
    act = activation(name)
    z = jnp.linspace(-3.0, 3.0, 7)
    s = jnp.array([0.1, 0.5, 0.9])
    jitted = jax.jit(activation_velocity, static_argnums=0)
    np.testing.assert_array_equal(jitted(act, z, 0.5), activation_velocity(act, z, 0.5))
    over_s = jax.vmap(lambda s_: activation_velocity(act, z, s_))(s)
    loop = jnp.stack([activation_velocity(act, z, s_) for s_ in s])
    np.testing.assert_allclose(over_s, loop, rtol=1e-15, atol=1e-15)
    over_z = jax.vmap(lambda z_: sigma_s_inverse(act, z_, 0.7))(z)
    np.testing.assert_allclose(over_z, sigma_s_inverse(act, z, 0.7), rtol=1e-15)
    # an Activation is static data inside a Module under jit
    module = _Holder(act)
    np.testing.assert_array_equal(
        eqx.filter_jit(lambda m, z_: m(z_))(module, z), activation_velocity(act, z, 0.3)
    )


class _Holder(eqx.Module):
    sigma: Activation = eqx.field(static=True)

    def __call__(self, z):
        return activation_velocity(self.sigma, z, 0.3)


@pytest.mark.parametrize("name", ["leaky_relu", "hard_sigmoid", "softplus"])
def test_float32_in_float32_out(name):
    act = activation(name)
    y = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32)
    s = jnp.asarray(0.4)  # float64: still float32 out
    for f in (sigma_s, sigma_s_inverse, activation_velocity):
        assert f(act, y, s).dtype == jnp.float32
        assert jax.grad(lambda s_, f=f: f(act, y, s_).sum())(s).dtype == jnp.float64
    assert sigma_s(act, jnp.array([1, 2]), 0.5).dtype == jnp.float64  # ints promoted


# Reading activations


def test_recognised_specs():
    assert activation(jax.nn.relu) == activation("relu")
    assert activation(jnp.tanh).name == "tanh"
    assert activation(jax.nn.identity).name == "identity"
    mlp = eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0))
    assert activation(mlp.final_activation).name == "identity"
    assert activation(mlp.activation).name == "relu"
    leaky = activation(functools.partial(jax.nn.leaky_relu, negative_slope=0.3))
    assert leaky.kind == "piecewise_linear" and leaky.slopes == (0.3, 1.0)
    elu = activation(functools.partial(jax.nn.elu, alpha=0.5))
    assert elu.kind == "smooth"
    act = activation("relu6")
    assert activation(act) is act
    assert hash(activation("tanh")) == hash(activation(jax.nn.tanh))
    own = activation(jnp.arctan, non_decreasing=True)
    assert own.kind == "smooth"
    z = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(sigma_s(own, sigma_s_inverse(own, z, 0.8), 0.8), z)


@pytest.mark.parametrize("name", SMOOTH)
def test_builtin_smooth_activations_pass_the_monotone_check(name):
    fn = getattr(jax.nn, name)
    activation(lambda x: fn(x), non_decreasing=True)  # raises if not


@pytest.mark.parametrize(
    "spec, match",
    [
        (jax.nn.gelu, "not non-decreasing.*s < 0.8857"),
        (functools.partial(jax.nn.gelu, approximate=False), "not non-decreasing"),
        (jax.nn.silu, "not non-decreasing.*s < 0.909224"),
        ("swish", "not non-decreasing"),
        (jax.nn.mish, "not non-decreasing"),
        (jnp.sin, "not non-decreasing.*s < 0.5"),
        (jnp.abs, "not non-decreasing"),
        (jax.nn.softmax, "not elementwise"),
        (jax.nn.log_softmax, "not elementwise"),
        ("softmax", "not elementwise"),
        (functools.partial(jax.nn.leaky_relu, negative_slope=-0.1), "negative_slope"),
        (lambda x: jnp.exp(x), "non_decreasing=True"),
        ("quadratic", "unknown activation name 'quadratic'; allowed: identity, relu"),
    ],
)
def test_refusals(spec, match):
    with pytest.raises(ValueError, match=match):
        activation(spec)


def test_refused_declarations():
    with pytest.raises(ValueError, match=r"declared non_decreasing but decreases"):
        activation(lambda x: x * jax.nn.sigmoid(x), non_decreasing=True)  # silu
    with pytest.raises(ValueError, match=r"decreases between y = 0 and y = 0.02 "):
        activation(lambda x: -jnp.abs(x), non_decreasing=True)
    with pytest.raises(ValueError, match="not elementwise"):
        activation(lambda x: x - jnp.mean(x), non_decreasing=True)
    with pytest.raises(ValueError, match="not elementwise.*maps shape"):
        activation(lambda x: jnp.cumsum(x)[:3], non_decreasing=True)
    with pytest.raises(ValueError, match="jumps"):
        activation(jnp.sign, non_decreasing=True)
    with pytest.raises(ValueError, match="slope -0.5 on piece 1 is negative"):
        piecewise_linear([0.0, 1.0], [1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        piecewise_linear([1.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="a name, a callable or an Activation"):
        activation(3.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="kind must be"):
        Activation("x", jnp.tanh, "wiggly")  # pyright: ignore[reportArgumentType]


# Case 11: non-monotone activations below and above their threshold


CASE11_FNS = {
    "silu": jax.nn.silu,
    "gelu_exact_erf": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh_approx": functools.partial(jax.nn.gelu, approximate=True),
}


@pytest.mark.parametrize("key", list(CASE11_FNS))
def test_case11_threshold_and_inverse(key):
    case = _case("case11_nonmonotone_activations.json")[key]
    fn = CASE11_FNS[key]
    s_star = homotopy_threshold(fn)
    assert abs(s_star - case["s_star"]) <= 1e-5  # measured: <= 2e-11
    y = jnp.linspace(-8.0, 8.0, 321)
    for s in [0.0, 0.5, 0.85, s_star - 1e-3]:
        z = (1 - s) * y + s * fn(y)
        y_back = inverse_below_threshold(fn, z, s)
        np.testing.assert_allclose(y_back, y, rtol=0, atol=1e-6)
    for s in [s_star, s_star + 1e-3, 1.0]:
        with pytest.raises(ValueError, match="invertible only for 0 <= s < s\\*"):
            inverse_below_threshold(fn, y, s)
    with pytest.raises(ValueError, match="not non-decreasing"):
        activation(fn)


def test_case11_two_preimages_at_s_one():
    case = _case("case11_nonmonotone_activations.json")["silu"]
    pre = jnp.asarray(case["two_preimages_of_-0.2_at_s_1"])
    np.testing.assert_allclose(jax.nn.silu(pre), -0.2, atol=1e-12)


@pytest.mark.parametrize(
    "fn, s, where",
    [
        (jax.nn.silu, 0.5, "s = 0.5 is inside that range"),
        ("gelu", 0.95, "s = 0.95 is outside that range"),
        (jnp.sin, 0.25, "s = 0.25 is inside that range"),
    ],
)
def test_sigma_s_inverse_refusal_points_to_inverse_below_threshold(fn, s, where):
    s_star = homotopy_threshold(fn)
    with pytest.raises(ValueError) as err:
        sigma_s_inverse(fn, jnp.ones(3), s)
    message = str(err.value)
    assert message.startswith("sigma_s_inverse refuses a non-monotone activation")
    assert f"0 <= s < s* = {s_star:.6f}" in message
    assert "flowjax.inverse_below_threshold(fn, z, s)" in message
    assert where in message
    assert "not non-decreasing" in message  # the reason is kept
    if callable(fn) and 0 <= s < s_star:  # the pointer works: eq. 34 solved
        y = inverse_below_threshold(fn, jnp.ones(3), s)
        np.testing.assert_allclose((1 - s) * y + s * fn(y), 1.0, rtol=1e-10)


def test_sigma_s_inverse_refusal_under_jit_asks_for_a_concrete_s():
    with pytest.raises(ValueError, match="inverse_below_threshold.*concrete s"):
        jax.jit(lambda s: sigma_s_inverse(jax.nn.silu, 1.0, s))(0.5)


def test_inverse_below_threshold_needs_concrete_s():
    with pytest.raises(ValueError, match="concrete s"):
        jax.jit(lambda s: inverse_below_threshold(jax.nn.silu, 0.1, s))(0.5)
    assert homotopy_threshold("tanh") == 1.0
    assert homotopy_threshold(activation("relu")) == 1.0
