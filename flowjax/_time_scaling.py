"""Time scalings `tau`: increasing maps of R onto [0, 1] that slow a stage's
homotopy down at its ends (sec. 3.1).

Each scaling is 0 for `s <= 0`, 1 for `s >= 1`, increasing in between, and symmetric:
`tau(1 - s) = 1 - tau(s)`. The symmetry gives `1 - tau(s)` to full relative
precision near `s = 1`, where `tau(s)` itself has rounded to 1.
"""

import math
from typing import Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float


TimeScalingName = Literal["smooth", "cubic", "linear"]
_NAMES: tuple[str, ...] = get_args(TimeScalingName)


def _as_float_array(s: ArrayLike) -> Array:
    """`s` as a floating array, keeping a floating dtype and promoting integers."""
    s = jnp.asarray(s)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.result_type(float))
    return s


def _smooth_cutoff(dtype) -> float:
    """The `c` below which `tau`, `tau'` and `tau''` of the smooth step are exactly 0.

    `tau(s) ~ exp(1 - 1/s)` near 0; with `1/c` a little beyond
    `-log(smallest subnormal)` all three underflow to 0 in `dtype`, so switching
    to the constant branch at `c` changes no value, while keeping `1/s**2` far from
    overflow on the other branch (no `0 * inf` in values or gradients).
    """
    finfo = np.finfo(dtype)
    log_smallest = -math.log(float(finfo.smallest_subnormal))
    return 1.0 / (1.1 * log_smallest + 10.0)


def _smooth_logit(s: Array) -> Array:
    """`x(s) = 1/(1 - s) - 1/s`, so the smooth step is `sigmoid(x(s))` (sec. 3.1).

    From `tau = h(s) / (h(s) + h(1 - s)) = 1 / (1 + exp(1/s - 1/(1 - s)))` with
    `h(s) = exp(-1/s)`. Only called on `c <= s <= 1 - c`.
    """
    return 1 / (1 - s) - 1 / s


@jax.custom_jvp
def _smooth_tau(s: Array) -> Array:
    c = _smooth_cutoff(s.dtype)
    inside = (s > c) & (s < 1 - c)
    s_safe = jnp.where(inside, s, 0.5)  # double where: no NaN in unused branch
    tau_inside = jax.nn.sigmoid(_smooth_logit(s_safe))
    return jnp.where(inside, tau_inside, jnp.where(s <= c, 0.0, 1.0)).astype(s.dtype)


def _smooth_dtau(s: Array) -> Array:
    c = _smooth_cutoff(s.dtype)
    inside = (s > c) & (s < 1 - c)
    s_safe = jnp.where(inside, s, 0.5)
    x = _smooth_logit(s_safe)
    # tau' = tau (1 - tau) x'(s), x'(s) = 1/(1 - s)^2 + 1/s^2; 1 - tau = sigmoid(-x)
    # is taken directly, not by cancellation.
    dx = 1 / (1 - s_safe) ** 2 + 1 / s_safe**2
    dtau = jax.nn.sigmoid(x) * jax.nn.sigmoid(-x) * dx
    return jnp.where(inside, dtau, 0.0).astype(s.dtype)


@_smooth_tau.defjvp
def _smooth_tau_jvp(primals, tangents):
    # Autodiff of sigmoid would form 1 - tau by cancellation: wrong near s = 1.
    (s,), (s_dot,) = primals, tangents
    return _smooth_tau(s), _smooth_dtau(s) * s_dot


def _cubic_tau(s: Array) -> Array:
    r = jnp.clip(s, 0.0, 1.0)
    return r * r * (3 - 2 * r)


def _cubic_dtau(s: Array) -> Array:
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, 6 * s * (1 - s), 0.0).astype(s.dtype)


def _linear_tau(s: Array) -> Array:
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, s, jnp.where(s < 0, 0.0, 1.0)).astype(s.dtype)


def _linear_one_minus_tau(s: Array) -> Array:
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, 1 - s, jnp.where(s < 0, 1.0, 0.0)).astype(s.dtype)


def _linear_dtau(s: Array) -> Array:
    inside = (s >= 0) & (s <= 1)
    return jnp.where(inside, 1.0, 0.0).astype(s.dtype)


_TAU = {"smooth": _smooth_tau, "cubic": _cubic_tau, "linear": _linear_tau}
_DTAU = {"smooth": _smooth_dtau, "cubic": _cubic_dtau, "linear": _linear_dtau}
# 1 - tau(s) = tau(1 - s); 1 - s is exact for s in [1/2, 2].
_ONE_MINUS_TAU = {
    "smooth": lambda s: _smooth_tau(1 - s),
    "cubic": lambda s: _cubic_tau(1 - s),
    "linear": _linear_one_minus_tau,
}


def _tau_numpy(name: str, s: float) -> float:
    """`tau(s)` in float64 NumPy for `0 < s <= 1/2` (used by `tau_inverse`)."""
    if name == "smooth":
        with np.errstate(over="ignore"):
            return float(1 / (1 + np.exp(1 / s - 1 / (1 - s))))
    if name == "cubic":
        return s * s * (3 - 2 * s)
    return s


class TimeScaling(eqx.Module):
    """A time scaling `tau` and its derivative (sec. 3.1).

    `name` is one of `"smooth"` (C-infinity: `tau = h(s) / (h(s) + h(1 - s))`,
    `h(s) = exp(-1/s)`, every derivative vanishing at 0 and 1), `"cubic"`
    (`3 s^2 - 2 s^3`, C^1) or `"linear"` (`tau = s`, continuous only). All three
    are clamped to 0 for `s <= 0` and to 1 for `s >= 1`.

    The methods act elementwise on arrays of any shape, keep a floating dtype,
    and are safe under `jax.jit`, `jax.vmap` and `jax.grad` (no NaN in values or
    gradients, for any real `s`).
    """

    name: TimeScalingName = eqx.field(static=True, default="smooth")

    def __check_init__(self):
        if self.name not in _NAMES:
            raise ValueError(
                f"unknown time scaling {self.name!r}; allowed: {', '.join(_NAMES)}"
            )

    def tau(self, s: ArrayLike) -> Float[Array, "*shape"]:
        """`tau(s)`, elementwise (sec. 3.1)."""
        return _TAU[self.name](_as_float_array(s))

    def dtau(self, s: ArrayLike) -> Float[Array, "*shape"]:
        """`tau'(s)`, elementwise; 0 outside `[0, 1]`.

        For `"linear"` it is 1 on the closed interval `[0, 1]`.
        """
        return _DTAU[self.name](_as_float_array(s))

    def one_minus_tau(self, s: ArrayLike) -> Float[Array, "*shape"]:
        """`1 - tau(s)`, accurate to relative rounding near `s = 1`.

        Computed as `tau(1 - s)`; `1 - s` is exact for `s` in `[1/2, 2]`.
        """
        return _ONE_MINUS_TAU[self.name](_as_float_array(s))

    def tau_inverse(self, level: float) -> float:
        """The `s` in `[0, 1]` with `tau(s) = level`, as a Python float.

        A host-side helper (bisection in float64 NumPy, not traceable). For a level
        `1 - delta` with tiny `delta` prefer `one_minus_tau_inverse(delta)`: the
        float `1 - delta` carries `delta` only to about `1e-16` absolute.

        **Raises:** `ValueError` if `level` is not in `[0, 1]`.
        """
        level = _check_level(level, "tau_inverse")
        if level <= 0.5:
            return self._inverse_on_half(level)
        return 1.0 - self._inverse_on_half(1.0 - level)

    def one_minus_tau_inverse(self, delta: float) -> float:
        """The `s` in `[0, 1]` with `1 - tau(s) = delta`, as a Python float.

        Resolves `delta` to relative precision (by the symmetry, it solves
        `tau(r) = delta` and returns `1 - r`); used to stop a stage at
        `tau = 1 - delta`.

        **Raises:** `ValueError` if `delta` is not in `[0, 1]`.
        """
        delta = _check_level(delta, "one_minus_tau_inverse")
        if delta <= 0.5:
            return 1.0 - self._inverse_on_half(delta)
        return self._inverse_on_half(1.0 - delta)

    def _inverse_on_half(self, m: float) -> float:
        """The `r` in `[0, 1/2]` with `tau(r) = m` (`0 <= m <= 1/2`), by bisection."""
        if m == 0.0:
            return 0.0
        lo, hi = 0.0, 0.5
        while True:
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                return hi
            if _tau_numpy(self.name, mid) < m:
                lo = mid
            else:
                hi = mid


def _check_level(level: float, where: str) -> float:
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"{where} needs a value in [0, 1], got {level!r}")
    return level


def time_scaling(spec: "str | TimeScaling" = "smooth") -> TimeScaling:
    """The time scaling named by `spec`, or `spec` itself if it is one (sec. 3.1).

    **Arguments:** `spec`: `"smooth"` (the library's default), `"cubic"`,
    `"linear"`, or a `TimeScaling`.

    **Raises:** `ValueError` for an unknown name, `TypeError` for another type.
    """
    if isinstance(spec, TimeScaling):
        return spec
    if isinstance(spec, str):
        if spec not in _NAMES:
            raise ValueError(
                f"unknown time scaling {spec!r}; allowed: {', '.join(_NAMES)}"
            )
        return TimeScaling(spec)  # pyright: ignore[reportArgumentType]
    raise TypeError(
        f"time_scaling expects a name ({', '.join(_NAMES)}) or a TimeScaling, "
        f"got {type(spec).__name__}"
    )
