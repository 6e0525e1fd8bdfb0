import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax._time_scaling import TimeScaling, time_scaling


NAMES = ["smooth", "cubic", "linear"]
OUTSIDE_AND_ENDS = [-1.0, 0.0, 1.0, 2.0]


def _smooth_oracle(s):
    """`tau` and `1 - tau` of the smooth step in float64 NumPy, via logs (sec. 3.1).

    `log h(s) = -1/s`; `tau = h(s) / (h(s) + h(1 - s))`. Valid for `0 < s < 1`.
    """
    s = np.asarray(s, dtype=np.float64)
    log_h0, log_h1 = -1 / s, -1 / (1 - s)
    log_total = np.logaddexp(log_h0, log_h1)
    return np.exp(log_h0 - log_total), np.exp(log_h1 - log_total)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_and_clamping(name):
    T = time_scaling(name)
    s = jnp.array([-3.0, -1e-300, 0.0, 0.5, 1.0, 1.0 + 1e-15, 2.0])
    np.testing.assert_array_equal(T.tau(s), [0, 0, 0, 0.5, 1, 1, 1])
    np.testing.assert_array_equal(T.one_minus_tau(s), [1, 1, 1, 0.5, 0, 0, 0])


@pytest.mark.parametrize("name", NAMES)
def test_monotone_and_symmetric(name):
    T = time_scaling(name)
    s = jnp.linspace(-0.5, 1.5, 4001)
    tau = np.asarray(T.tau(s))
    assert np.all(np.diff(tau) >= 0)
    inner = np.asarray(T.tau(jnp.linspace(0.05, 0.95, 901)))
    assert np.all(np.diff(inner) > 0)
    # tau(1 - s) = 1 - tau(s), and tau + (1 - tau) = 1 to rounding.
    np.testing.assert_allclose(T.tau(1 - s), T.one_minus_tau(s), rtol=0, atol=1e-15)
    np.testing.assert_allclose(T.tau(s) + T.one_minus_tau(s), 1.0, rtol=0, atol=3e-16)


@pytest.mark.parametrize("name", NAMES)
def test_dtau_matches_central_differences(name):
    T = time_scaling(name)
    s = np.linspace(0.02, 0.98, 97)
    h = 1e-6
    fd = (np.asarray(T.tau(s + h)) - np.asarray(T.tau(s - h))) / (2 * h)
    np.testing.assert_allclose(T.dtau(s), fd, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_dtau_matches_jax_grad_everywhere(name):
    T = time_scaling(name)
    s = jnp.concatenate([jnp.linspace(-0.5, 1.5, 401), jnp.array(OUTSIDE_AND_ENDS)])
    grad = jax.vmap(jax.grad(T.tau))(s)
    np.testing.assert_allclose(grad, T.dtau(s), rtol=1e-14, atol=0)
    # one_minus_tau(s) = tau(1 - s): near s = 0 the rounding of 1 - s moves the
    # tiny derivative by ~|x'(s)| eps relative, x'(s) = 1/s^2 + 1/(1 - s)^2.
    grad_c = jax.vmap(jax.grad(T.one_minus_tau))(s)
    np.testing.assert_allclose(grad_c, -T.dtau(s), rtol=1e-11, atol=0)


@pytest.mark.parametrize("name", ["smooth", "cubic"])
def test_dtau_vanishes_at_ends(name):
    T = time_scaling(name)
    np.testing.assert_array_equal(T.dtau(jnp.array([0.0, 1.0])), [0.0, 0.0])
    assert float(T.dtau(0.5)) > 1.0


def test_linear_dtau_is_one_on_closed_interval():
    T = time_scaling("linear")
    s = jnp.array([-1e-12, 0.0, 0.3, 1.0, 1 + 1e-12])
    np.testing.assert_array_equal(T.dtau(s), [0, 1, 1, 1, 0])


def test_smooth_all_derivatives_small_at_ends():
    T = time_scaling("smooth")
    d1, d2 = T.dtau, jax.grad(T.dtau)
    d3 = jax.grad(d2)
    for d in (d1, d2, d3):
        assert float(d(0.0)) == 0.0 and float(d(1.0)) == 0.0
        assert abs(float(d(0.01))) < 1e-25 and abs(float(d(0.99))) < 1e-25


def test_smooth_matches_log_oracle_near_both_ends():
    T = time_scaling("smooth")
    s = np.concatenate([np.linspace(0.002, 0.2, 100), np.linspace(0.8, 0.998, 100)])
    tau, one_minus = _smooth_oracle(s)
    np.testing.assert_allclose(T.tau(s), tau, rtol=1e-11, atol=0)
    np.testing.assert_allclose(T.one_minus_tau(s), one_minus, rtol=1e-11, atol=0)
    # 1 - tau is resolved where tau itself has rounded to 1 (math.md 6.7).
    assert float(T.tau(0.98)) == 1.0 and float(T.one_minus_tau(0.98)) > 0


def test_smooth_float32_matches_log_oracle():
    T = time_scaling("smooth")
    s32 = np.concatenate([np.linspace(0.02, 0.2, 50), np.linspace(0.8, 0.98, 50)])
    s32 = s32.astype(np.float32)
    tau, one_minus = _smooth_oracle(s32.astype(np.float64))
    np.testing.assert_allclose(T.tau(s32), tau, rtol=2e-5, atol=0)
    np.testing.assert_allclose(T.one_minus_tau(s32), one_minus, rtol=2e-5, atol=0)


def test_cubic_one_minus_tau_closed_form():
    T = time_scaling("cubic")
    s = np.linspace(0.9, 1.0 - 1e-9, 200)
    # 1 - (3 s^2 - 2 s^3) = (1 - s)^2 (1 + 2 s)
    np.testing.assert_allclose(
        T.one_minus_tau(s), (1 - s) ** 2 * (1 + 2 * s), rtol=1e-14, atol=0
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_no_nan_in_gradients(name, dtype):
    T = time_scaling(name)
    s = jnp.array(OUTSIDE_AND_ENDS + [1e-300, 1e-30, 1e-3, 0.5, 1 - 1e-3], dtype)
    for f in (T.tau, T.dtau, T.one_minus_tau):
        g = jax.vmap(jax.grad(f))(s)
        gg = jax.vmap(jax.grad(jax.grad(f)))(s)
        assert g.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.isfinite(gg)))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_preserved_and_jit(name):
    T = time_scaling(name)
    s32 = jnp.linspace(-0.2, 1.2, 15, dtype=jnp.float32)
    for f in (T.tau, T.dtau, T.one_minus_tau):
        assert f(s32).dtype == jnp.float32
        assert f(s32.astype(jnp.float64)).dtype == jnp.float64
        np.testing.assert_array_equal(jax.jit(f)(s32), f(s32))
    assert T.tau(jnp.array([0, 1])).dtype == jnp.float64  # integers promoted
    # A TimeScaling is static data inside jit.
    out = eqx.filter_jit(lambda T, s: T.tau(s))(T, s32)
    np.testing.assert_array_equal(out, T.tau(s32))


@pytest.mark.parametrize("name", NAMES)
def test_tau_inverse(name):
    T = time_scaling(name)
    for level in [0.0, 1e-300, 1e-12, 0.1, 0.5, 0.7, 1 - 1e-9, 1.0]:
        s = T.tau_inverse(level)
        assert 0.0 <= s <= 1.0
        np.testing.assert_allclose(float(T.tau(s)), level, rtol=1e-12, atol=1e-16)
    for delta in [1e-15, 1e-12, 1e-6, 0.3]:
        s = T.one_minus_tau_inverse(delta)
        # s carries one rounding (~1.1e-16 absolute); 1 - tau moves by
        # |d log(1 - tau)/ds| times that, relative.
        rtol = 1e-12 + 2.3e-16 * float(T.dtau(s)) / delta
        np.testing.assert_allclose(float(T.one_minus_tau(s)), delta, rtol=rtol)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        T.tau_inverse(1.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        T.one_minus_tau_inverse(-0.1)


def test_time_scaling_spec():
    assert time_scaling("smooth") == TimeScaling()
    T = TimeScaling("cubic")
    assert time_scaling(T) is T
    assert hash(time_scaling("linear")) == hash(TimeScaling("linear"))
    with pytest.raises(ValueError, match="allowed: smooth, cubic, linear"):
        time_scaling("quintic")
    with pytest.raises(ValueError, match="allowed: smooth, cubic, linear"):
        TimeScaling("quintic")  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="TimeScaling"):
        time_scaling(3)  # pyright: ignore[reportArgumentType]
