"""Activations and their homotopy `sigma_s(y) = (1 - s) y + s sigma(y)` (sec. 3.4).

An `Activation` records an elementwise non-decreasing `sigma` and how to invert its
homotopy: exactly, piece by piece, when `sigma` is piecewise linear (eq. 43-47), or
by a safeguarded Newton iteration otherwise. The stage velocity of the activation
flow is `(sigma - I)(sigma_s^{-1}(z))` (eq. 40-41).

Everything acts elementwise on arrays of any shape, keeps the input's floating
dtype, and is safe under `jax.jit`, `jax.vmap` and `jax.grad` for `s` in `[0, 1)`.
At `s = 1` a piece of slope 0 collapses to a point and `sigma_s` has no inverse
there; the functions stay finite but the values are not limits along trajectories
(the flow model stops the stage short of `s = 1` and closes it exactly).
"""

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float


ActivationKind = Literal["piecewise_linear", "smooth"]


# Piecewise-linear descriptions


def _float_tuple(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _knot_values(
    breakpoints: tuple[float, ...], slopes: tuple[float, ...], value_at_zero: float
) -> tuple[float, ...]:
    """`sigma(b_i)` at each breakpoint, integrating the slopes from `sigma(0)`."""
    edges = (-math.inf, *breakpoints, math.inf)
    values = []
    for b in breakpoints:
        lo, hi = min(0.0, b), max(0.0, b)
        parts = [
            c * (min(edges[j + 1], hi) - max(edges[j], lo))
            for j, c in enumerate(slopes)
            if min(edges[j + 1], hi) > max(edges[j], lo)
        ]
        values.append(value_at_zero + math.copysign(1.0, b) * math.fsum(parts))
    return tuple(values)


def _pieces(
    breakpoints: tuple[float, ...], slopes: tuple[float, ...], value_at_zero: float
) -> tuple[tuple[float, float, float, float, float], ...]:
    """Each linear piece as `(b, sigma(b), a, sigma(a), c)`.

    `b` is the breakpoint where the piece starts (`-inf` for the first piece), `a`
    the point of the piece nearest 0 (so small `y` keep their relative precision),
    `c` the slope.
    """
    knots = _knot_values(breakpoints, slopes, value_at_zero)
    starts = ((-math.inf, math.nan), *zip(breakpoints, knots, strict=True))
    ends = (*zip(breakpoints, knots, strict=True), (math.inf, math.nan))
    pieces = []
    for (b, fb), (e, fe), c in zip(starts, ends, slopes, strict=True):
        if b <= 0.0 <= e:
            a, fa = 0.0, value_at_zero
        elif e < 0.0:
            a, fa = e, fe
        else:
            a, fa = b, fb
        pieces.append((b, fb, a, fa, c))
    return tuple(pieces)


def _eval_piecewise_linear(pieces, y: Array) -> Array:
    out = y
    for i, (b, _, a, fa, c) in enumerate(pieces):
        out_i = fa + c * (y - a)
        out = out_i if i == 0 else jnp.where(y >= b, out_i, out)
    return out.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class _PiecewiseLinearFunction:
    """A user-built piecewise-linear function (hashable, compared by value)."""

    breakpoints: tuple[float, ...]
    slopes: tuple[float, ...]
    value_at_zero: float

    def __call__(self, y: ArrayLike) -> Array:
        y = _as_float_array(y)
        pieces = _pieces(self.breakpoints, self.slopes, self.value_at_zero)
        return _eval_piecewise_linear(pieces, y)


def _check_piecewise_linear(
    name: str,
    breakpoints: tuple[float, ...],
    slopes: tuple[float, ...],
    value_at_zero: float,
) -> None:
    if len(slopes) != len(breakpoints) + 1:
        raise ValueError(
            f"activation {name!r}: {len(breakpoints)} breakpoints need "
            f"{len(breakpoints) + 1} slopes, got {len(slopes)}."
        )
    if not all(math.isfinite(v) for v in (*breakpoints, *slopes, value_at_zero)):
        raise ValueError(
            f"activation {name!r}: breakpoints, slopes and value_at_zero must be "
            f"finite, got {breakpoints}, {slopes}, {value_at_zero}."
        )
    if any(b1 <= b0 for b0, b1 in zip(breakpoints[:-1], breakpoints[1:], strict=True)):
        raise ValueError(
            f"activation {name!r}: breakpoints must be strictly increasing, got "
            f"{breakpoints}."
        )
    negative = [i for i, c in enumerate(slopes) if c < 0]
    if negative:
        i = negative[0]
        raise ValueError(
            f"activation {name!r}: slope {slopes[i]} on piece {i} is negative; the "
            "activation flow needs a non-decreasing activation (all slopes >= 0), "
            "else sigma_s is not invertible for s near 1 (sec. 3.4)."
        )


# The record


class Activation(eqx.Module):
    """An elementwise non-decreasing activation and how to invert its homotopy.

    All fields are static (hashable), so an `Activation` can sit inside other
    Modules as static data. Calling it applies `fn`.

    - `name`: a label (`"relu"`, `"tanh"`, ...; `"identity"` for the identity).
    - `fn`: the elementwise function itself.
    - `kind`: `"piecewise_linear"` (exact inverse, eq. 43-47) or `"smooth"` (any
      other non-decreasing function; inverse by safeguarded Newton).
    - `breakpoints`, `slopes`, `value_at_zero`: for `"piecewise_linear"`, strictly
      increasing breakpoints `b_1 < ... < b_n`, the `n + 1` slopes (all `>= 0`)
      from left to right, and `fn(0)`. Empty and 0 for `"smooth"`.

    Build one with `flowjax.activation(...)` or `flowjax.piecewise_linear(...)`.
    """

    name: str = eqx.field(static=True)
    fn: Callable[[Array], Array] = eqx.field(static=True)
    kind: ActivationKind = eqx.field(static=True)
    breakpoints: tuple[float, ...] = eqx.field(
        static=True, default=(), converter=_float_tuple
    )
    slopes: tuple[float, ...] = eqx.field(
        static=True, default=(), converter=_float_tuple
    )
    value_at_zero: float = eqx.field(static=True, default=0.0, converter=float)

    def __check_init__(self):
        if self.kind == "piecewise_linear":
            _check_piecewise_linear(
                self.name, self.breakpoints, self.slopes, self.value_at_zero
            )
        elif self.kind == "smooth":
            if self.breakpoints or self.slopes:
                raise ValueError(
                    f"activation {self.name!r}: a 'smooth' activation takes no "
                    "breakpoints or slopes."
                )
        else:
            raise ValueError(
                f"activation {self.name!r}: kind must be 'piecewise_linear' or "
                f"'smooth', got {self.kind!r}."
            )

    def __call__(self, y: ArrayLike) -> Array:
        y = _as_float_array(y)
        return jnp.asarray(self.fn(y)).astype(y.dtype)


def piecewise_linear(
    breakpoints: Sequence[float],
    slopes: Sequence[float],
    value_at_zero: float = 0.0,
    *,
    name: str = "piecewise_linear",
) -> Activation:
    """A continuous piecewise-linear non-decreasing activation.

    **Arguments:**

    - `breakpoints`: `n` strictly increasing points `b_1 < ... < b_n` (may be empty).
    - `slopes`: `n + 1` slopes, left of `b_1`, between breakpoints, right of `b_n`;
      all must be `>= 0`.
    - `value_at_zero`: `sigma(0)`, which fixes the constant.

    **Raises:** `ValueError` for a negative slope, mismatched lengths, unsorted or
    non-finite values.

    For example `piecewise_linear([0.0], [0.2, 1.0])` is a leaky ReLU of slope 0.2.
    """
    bp, sl, v0 = _float_tuple(breakpoints), _float_tuple(slopes), float(value_at_zero)
    _check_piecewise_linear(name, bp, sl, v0)
    fn = _PiecewiseLinearFunction(bp, sl, v0)
    return Activation(name, fn, "piecewise_linear", bp, sl, v0)


# The homotopy and its inverse


def _as_float_array(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _prepare(act: "Activation | Any", x: ArrayLike, s: ArrayLike):
    """`act` as an `Activation`, `x` as a float array, `s` in `x`'s dtype."""
    if not isinstance(act, Activation):
        act = activation(act)
    x = _as_float_array(x)
    s = jnp.asarray(s, dtype=x.dtype)
    shape = jnp.broadcast_shapes(x.shape, s.shape)
    return act, jnp.broadcast_to(x, shape), s


def _apply(fn: Callable, y: Array) -> Array:
    return jnp.asarray(fn(y)).astype(y.dtype)


def sigma_s(
    act: "Activation | Any", y: Float[ArrayLike, "*shape"], s: Float[ArrayLike, ""]
) -> Float[Array, "*shape"]:
    """`sigma_s(y) = (1 - s) y + s sigma(y)`, elementwise (eq. 34-36).

    `act` is an `Activation` or anything `flowjax.activation` accepts; `s` is a
    scalar (it may be traced).
    """
    return _sigma_s(*_prepare(act, y, s))


def _sigma_s(act: Activation, y: Array, s: Array) -> Array:
    return (1 - s) * y + s * _apply(act.fn, y)


def _piecewise_inverse_and_velocity(act: Activation, z: Array, s: Array):
    """`y = sigma_s^{-1}(z)` and `sigma(y) - y` for a piecewise-linear `sigma`.

    On a piece with slope `c` through `(a, sigma(a))`, `sigma_s` has slope
    `m = (1 - s) + s c` (`>= 1 - s > 0` for `s < 1`; a sum of non-negative terms,
    so no cancellation near `s = 1`) and passes through `w = (1 - s) a + s sigma(a)`,
    so `y = a + (z - w) / m` and `sigma(y) - y = (sigma(a) - a) + (c - 1)(z - w) / m`.
    The piece holds `z >= sigma_s(b)` beyond its starting breakpoint `b`. For
    ReLU this is `(relu(z) - z) / (1 - s)` exactly (eq. 43-47).
    """
    y_out = v_out = z
    pieces = _pieces(act.breakpoints, act.slopes, act.value_at_zero)
    for i, (b, fb, a, fa, c) in enumerate(pieces):
        w = (1 - s) * a + s * fa
        m = (1 - s) + s * c
        # At s = 1 a flat piece has m = 0: it collapses to the point w (no inverse).
        live = m > 0
        m_safe = jnp.where(live, m, 1)
        dz = z - w
        y_i = a + jnp.where(live, dz / m_safe, 0)
        v_i = (fa - a) + jnp.where(live, (c - 1) * dz / m_safe, 0)
        if i == 0:
            y_out, v_out = y_i, v_i
        else:
            on_piece = z >= (1 - s) * b + s * fb
            y_out = jnp.where(on_piece, y_i, y_out)
            v_out = jnp.where(on_piece, v_i, v_out)
    return y_out.astype(z.dtype), v_out.astype(z.dtype)


def _newton_solve(fn: Callable, z: Array, s: Array, slope_floor: Array) -> Array:
    """Solve `(1 - s) y + s fn(y) = z` for `y`, elementwise, in bounded time.

    Needs `sigma_s' >= slope_floor > 0`. Then, with `g0 = sigma_s(z) - z`, the root
    lies between `z` and `z - g0 / slope_floor`; each step takes Newton's point when
    it falls strictly inside the current bracket and bisects otherwise. Stops when
    the residual is at rounding level or the step is below rounding, or after
    `2 * mantissa + 10` steps (enough to bisect any bracket to rounding).
    """
    finfo = jnp.finfo(z.dtype)
    eps, tiny = float(finfo.eps), float(finfo.tiny)
    max_steps = 2 * int(finfo.nmant) + 10

    def residual(y):
        f, df = jax.jvp(lambda u: _apply(fn, u), (y,), (jnp.ones_like(y),))
        g = (1 - s) * y + s * f - z
        noise = eps * (jnp.abs((1 - s) * y) + jnp.abs(s * f) + jnp.abs(z))
        return g, (1 - s) + s * df, noise

    g0 = s * (_apply(fn, z) - z)
    width = 2 * jnp.abs(g0) / slope_floor
    lo = jnp.where(g0 > 0, z - width, z)
    hi = jnp.where(g0 > 0, z, z + width)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_steps) & ~jnp.all(done)

    def body(state):
        step, y, lo, hi, done = state
        g, slope, noise = residual(y)
        lo = jnp.where(g < 0, y, lo)
        hi = jnp.where(g > 0, y, hi)
        y_newton = y - g / slope
        inside = (y_newton > lo) & (y_newton < hi)  # False for NaN or inf
        at_root = jnp.abs(g) <= noise
        y_new = jnp.where(inside, y_newton, lo + 0.5 * (hi - lo))
        y_new = jnp.where(at_root, y, y_new)
        small_step = jnp.abs(y_new - y) <= 2 * eps * jnp.abs(y_new) + tiny
        return step + 1, jnp.where(done, y, y_new), lo, hi, done | at_root | small_step

    state = (jnp.array(0), z, lo, hi, (g0 == 0) | ~jnp.isfinite(g0))
    return jax.lax.while_loop(cond, body, state)[1]


@functools.cache
def _implicit_inverse(fn: Callable) -> Callable:
    """`(z, s, slope_floor) -> sigma_s^{-1}(z)`, differentiable by implicit function.

    `dz = sigma_s'(y) dy + (sigma(y) - y) ds`, so
    `dy = (dz - (sigma(y) - y) ds) / sigma_s'(y)` (the bracket `slope_floor` has no
    effect on the root and gets no derivative).
    """

    @jax.custom_jvp
    def inverse(z, s, slope_floor):
        return _newton_solve(fn, z, s, slope_floor)

    @inverse.defjvp
    def inverse_jvp(primals, tangents):
        z, s, slope_floor = primals
        z_dot, s_dot, _ = tangents
        y = inverse(z, s, slope_floor)
        f, df = jax.jvp(lambda u: _apply(fn, u), (y,), (jnp.ones_like(y),))
        y_dot = (z_dot - (f - y) * s_dot) / ((1 - s) + s * df)
        return y, y_dot

    return jax.jit(inverse)


def sigma_s_inverse(
    act: "Activation | Any", z: Float[ArrayLike, "*shape"], s: Float[ArrayLike, ""]
) -> Float[Array, "*shape"]:
    """`y = sigma_s^{-1}(z)`: the `y` with `(1 - s) y + s sigma(y) = z` (eq. 34-36).

    Exact piece by piece for a piecewise-linear `sigma`; otherwise a safeguarded
    Newton iteration (converging to rounding) differentiated by the implicit
    function theorem, so `jax.grad` and `jax.jvp` work in `z` and `s`.

    For `s` in `[0, 1)`, `sigma_s` has slope `>= 1 - s > 0` and the inverse is
    unique. Near `s = 1` a saturating `sigma` (tanh, sigmoid) makes it
    ill-conditioned: the error grows like `eps |z| / sigma_s'(y)`. At `s = 1` the
    result is finite but meaningless where `sigma` is flat or `z` is outside its
    range.
    """
    try:
        prepared = _prepare(act, z, s)
    except _NonMonotoneError as err:
        raise ValueError(_below_threshold_hint(err, s)) from None
    return _sigma_s_inverse(*prepared)


def _below_threshold_hint(err: "_NonMonotoneError", s: ArrayLike) -> str:
    """The refusal of `err`, pointing to `inverse_below_threshold` for this `s`."""
    allowed = f"0 <= s < s* = {err.s_star:.6f}"
    try:
        value = float(s)  # pyright: ignore[reportArgumentType]
    except (TypeError, jax.errors.ConcretizationTypeError):
        where = "it needs a concrete s (a Python float)"
    else:
        inside = 0.0 <= value < err.s_star
        where = f"s = {value:g} is {'inside' if inside else 'outside'} that range"
    return (
        f"sigma_s_inverse refuses a non-monotone activation; for one fixed s with "
        f"{allowed}, use flowjax.inverse_below_threshold(fn, z, s) ({where}). "
        f"Reason: {err}"
    )


def _sigma_s_inverse(act: Activation, z: Array, s: Array) -> Array:
    if act.kind == "piecewise_linear":
        return _piecewise_inverse_and_velocity(act, z, s)[0]
    slope_floor = jnp.maximum(1 - s, jnp.finfo(z.dtype).eps)
    return _implicit_inverse(act.fn)(z, s, slope_floor)


def activation_velocity(
    act: "Activation | Any", z: Float[ArrayLike, "*shape"], s: Float[ArrayLike, ""]
) -> Float[Array, "*shape"]:
    """The stage velocity `v(z, s) = (sigma - I)(sigma_s^{-1}(z))` (eq. 40-41).

    Along `z(s) = sigma_s(y)` it is `dz/ds`. For ReLU it is exactly
    `(relu(z) - z) / (1 - s)` (eq. 43-47); for a leaky ReLU of slope `a` it is
    `(a - 1) z / ((1 - s) + s a)` on `z < 0`, i.e. `(a - 1) z / (1 - s (1 - a))`
    without that form's cancellation near `s = 1`.
    """
    return _activation_velocity(*_prepare(act, z, s))


def _activation_velocity(act: Activation, z: Array, s: Array) -> Array:
    if act.kind == "piecewise_linear":
        return _piecewise_inverse_and_velocity(act, z, s)[1]
    y = _sigma_s_inverse(act, z, s)
    return _apply(act.fn, y) - y


# Non-monotone activations: where the homotopy stops being invertible


def _derivative(fn: Callable, y: Array) -> Array:
    return jax.jvp(lambda u: _apply(fn, u), (y,), (jnp.ones_like(y),))[1]


def _min_slope(fn: Callable) -> tuple[float, float]:
    """`(min sigma', argmin)` over `[-20, 20]`: a grid, then two finer grids."""
    d_min, y_min = math.inf, 0.0
    derivative = jax.jit(functools.partial(_derivative, fn))
    with jax.ensure_compile_time_eval():
        y = jnp.linspace(-20.0, 20.0, 2001)
        for _ in range(3):
            d = np.asarray(derivative(y))
            if not np.all(np.isfinite(d)):
                bad = float(np.asarray(y)[~np.isfinite(d)][0])
                raise ValueError(f"the derivative of {fn!r} is not finite at y = {bad}")
            i = int(np.argmin(d))
            y_np = np.asarray(y)
            lo, hi = y_np[max(i - 1, 0)], y_np[min(i + 1, len(y_np) - 1)]
            y_min, d_min = float(y_np[i]), float(d[i])
            y = jnp.linspace(lo, hi, 2001)
    return d_min, y_min


def _threshold_from_slope(min_slope: float) -> float:
    return 1.0 / (1.0 - min_slope) if min_slope < 0 else 1.0


def homotopy_threshold(fn: "Activation | Callable | str") -> float:
    """`s*`: `sigma_s` is strictly increasing exactly for `s < s*` (sec. 3.4).

    `sigma_s' = 1 - s + s sigma'`, so `s* = 1 / (1 - min sigma')` when
    `min sigma' < 0`, and `s* = 1` for a non-decreasing `sigma`. The minimum is
    found on `[-20, 20]` (a grid refined twice), in the default float dtype. E.g.
    silu: 0.909224, gelu: 0.885745 (tanh form), 0.885815 (erf form).
    """
    if isinstance(fn, Activation):
        return 1.0
    if isinstance(fn, str):
        fn = _lookup_function(fn)
    return _threshold_from_slope(_min_slope(fn)[0])


def inverse_below_threshold(
    fn: Callable | str, z: Float[ArrayLike, "*shape"], s: float
) -> Float[Array, "*shape"]:
    """`sigma_s^{-1}(z)` for a possibly non-monotone `fn`, for concrete `0 <= s < s*`.

    Below `s* = homotopy_threshold(fn)` the slope of `sigma_s` is at least
    `1 - s / s* > 0`, so the safeguarded Newton iteration of `sigma_s_inverse`
    applies. Differentiable in `z`.

    **Raises:** `ValueError` if `s` is traced, or not in `[0, s*)`.
    """
    if isinstance(fn, str):
        fn = _lookup_function(fn)
    try:
        s_value = float(s)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            "inverse_below_threshold needs a concrete s (a Python float), not a "
            "traced value: whether sigma_s is invertible depends on it."
        ) from None
    s_star = homotopy_threshold(fn)
    if not 0.0 <= s_value < s_star:
        raise ValueError(
            f"sigma_s of {_describe(fn)} is invertible only for 0 <= s < s* = "
            f"{s_star:.6f}, got s = {s_value}: for larger s it is not monotone."
        )
    z = _as_float_array(z)
    s_arr = jnp.asarray(s_value, dtype=z.dtype)
    slope_floor = jnp.asarray(1.0 - s_value / s_star, dtype=z.dtype)
    return _implicit_inverse(fn)(z, s_arr, slope_floor)


# Recognising activations


def _default(fn: Callable, parameter: str) -> float:
    return float(inspect.signature(fn).parameters[parameter].default)


def _identity(x: Array) -> Array:
    return x


def _registry() -> tuple[dict[str, tuple], dict[str, Callable]]:
    """Known non-decreasing activations: piecewise-linear ones with their
    `(fn, breakpoints, slopes, value_at_zero)`, and smooth ones."""
    nn = jax.nn
    leaky = _default(nn.leaky_relu, "negative_slope")
    pwl: dict[str, tuple] = {
        "identity": (getattr(nn, "identity", _identity), (), (1.0,), 0.0),
        "relu": (nn.relu, (0.0,), (0.0, 1.0), 0.0),
        "leaky_relu": (nn.leaky_relu, (0.0,), (leaky, 1.0), 0.0),
        "relu6": (nn.relu6, (0.0, 6.0), (0.0, 1.0, 0.0), 0.0),
        "hard_tanh": (nn.hard_tanh, (-1.0, 1.0), (0.0, 1.0, 0.0), 0.0),
        "hard_sigmoid": (nn.hard_sigmoid, (-3.0, 3.0), (0.0, 1 / 6, 0.0), 0.5),
    }
    if hasattr(nn, "sparse_sigmoid"):
        pwl["sparse_sigmoid"] = (nn.sparse_sigmoid, (-1.0, 1.0), (0.0, 0.5, 0.0), 0.5)
    smooth_names = [
        "tanh", "sigmoid", "softplus", "elu", "celu", "selu", "log_sigmoid",
        "soft_sign", "sparse_plus", "squareplus",
    ]  # fmt: skip
    smooth = {n: getattr(nn, n) for n in smooth_names if hasattr(nn, n)}
    return pwl, smooth


_PIECEWISE_LINEAR, _SMOOTH = _registry()
# Known activations the flow cannot use, with the reason.
_NON_MONOTONE_NAMES = ("gelu", "silu", "swish", "mish", "hard_silu", "hard_swish")
_NON_ELEMENTWISE_NAMES = (
    "softmax", "log_softmax", "glu", "standardize", "logsumexp", "logmeanexp",
    "one_hot",
)  # fmt: skip
_NON_MONOTONE = {
    n: getattr(jax.nn, n) for n in _NON_MONOTONE_NAMES if hasattr(jax.nn, n)
}
_NON_MONOTONE.update({"sin": jnp.sin, "cos": jnp.cos, "abs": jnp.abs})
_NON_ELEMENTWISE = {
    n: getattr(jax.nn, n) for n in _NON_ELEMENTWISE_NAMES if hasattr(jax.nn, n)
}
# The keyword parameter a functools.partial of these may fix.
_PARAMETERS = {"leaky_relu": "negative_slope", "elu": "alpha", "celu": "alpha"}


def _allowed() -> str:
    names = ", ".join([*_PIECEWISE_LINEAR, *_SMOOTH])
    return (
        f"allowed: {names}, functools.partial(jax.nn.leaky_relu, negative_slope=a) "
        "with a >= 0, flowjax.piecewise_linear(...), or your own elementwise "
        "non-decreasing function declared with non_decreasing=True"
    )


def _lookup_function(name: str) -> Callable:
    for table in (_SMOOTH, _NON_MONOTONE, _NON_ELEMENTWISE):
        if name in table:
            return table[name]
    if name in _PIECEWISE_LINEAR:
        return _PIECEWISE_LINEAR[name][0]
    raise ValueError(f"unknown activation name {name!r}; {_allowed()}.")


def _describe(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _find(table: dict[str, Any], fn: Callable, entry=lambda v: v) -> str | None:
    for name, value in table.items():
        if entry(value) is fn:
            return name
    return None


def _is_equinox_identity(fn: Callable) -> bool:
    """Equinox's default `final_activation` (a lambda in `equinox.nn._mlp`)."""
    try:
        from equinox.nn import _mlp

        if fn is getattr(_mlp, "_identity", None):
            return True
    except ImportError:
        pass
    module = getattr(fn, "__module__", "") or ""
    if not (module.startswith("equinox") and getattr(fn, "__name__", "") == "<lambda>"):
        return False
    probe = jnp.asarray([-1.5, 0.0, 2.25])
    with jax.ensure_compile_time_eval():
        try:
            return bool(jnp.array_equal(fn(probe), probe))
        except Exception:
            return False


class _NonMonotoneError(ValueError):
    """The refusal of a non-monotone activation; knows `fn` and its `s*`."""

    def __init__(self, message: str, fn: Callable, s_star: float):
        super().__init__(message)
        self.fn, self.s_star = fn, s_star


def _refuse_non_monotone(name: str, fn: Callable) -> ValueError:
    min_slope, at = _min_slope(fn)
    s_star = _threshold_from_slope(min_slope)
    return _NonMonotoneError(
        f"activation {name!r} is not non-decreasing (its slope is {min_slope:.4g} at "
        f"y = {at:.4g}), so sigma_s(y) = (1 - s) y + s {name}(y) is invertible only "
        f"for s < {s_star:.6f}; near s = 1 it has no inverse and the activation "
        f"flow (sec. 3.4) does not exist. Use a non-decreasing activation; "
        f"{_allowed()}.",
        fn,
        s_star,
    )


def _refuse_non_elementwise(name: str, detail: str = "") -> ValueError:
    return ValueError(
        f"activation {name!r} is not elementwise{detail}: the activation flow "
        "inverts sigma_s coordinate by coordinate (sec. 3.4), so it needs an "
        f"activation that acts on each coordinate separately; {_allowed()}."
    )


def _from_name(name: str) -> Activation:
    if name in _PIECEWISE_LINEAR:
        fn, bp, sl, v0 = _PIECEWISE_LINEAR[name]
        return Activation(name, fn, "piecewise_linear", bp, sl, v0)
    if name in _SMOOTH:
        return Activation(name, _SMOOTH[name], "smooth")
    if name in _NON_MONOTONE:
        raise _refuse_non_monotone(name, _NON_MONOTONE[name])
    if name in _NON_ELEMENTWISE:
        raise _refuse_non_elementwise(name)
    raise ValueError(f"unknown activation name {name!r}; {_allowed()}.")


def _from_partial(spec: functools.partial) -> Activation | None:
    """`functools.partial(jax.nn.leaky_relu, negative_slope=a)` and kin."""
    name = _find(_PIECEWISE_LINEAR, spec.func, lambda v: v[0]) or _find(
        _SMOOTH, spec.func
    )
    if name is None or spec.args or set(spec.keywords) - {_PARAMETERS.get(name)}:
        return None
    if not spec.keywords:
        return dataclasses.replace(_from_name(name), fn=spec)
    (value,) = spec.keywords.values()
    value = float(value)
    label = f"{name}({_PARAMETERS[name]}={value})"
    if name == "leaky_relu":
        if not value >= 0:
            raise ValueError(
                f"activation {label!r} decreases on negatives (negative_slope < 0); "
                f"the activation flow needs a non-decreasing activation; {_allowed()}."
            )
        return Activation(label, spec, "piecewise_linear", (0.0,), (value, 1.0), 0.0)
    if not (value > 0 if name == "celu" else value >= 0):
        raise ValueError(
            f"activation {label!r} is not non-decreasing for this alpha (needs "
            f"alpha {'>' if name == 'celu' else '>='} 0); {_allowed()}."
        )
    return Activation(label, spec, "smooth")


def _from_callable(spec: Callable) -> Activation | None:
    name = _find(_PIECEWISE_LINEAR, spec, lambda v: v[0])
    if name is not None:
        return _from_name(name)
    name = _find(_SMOOTH, spec)
    if name is not None:
        return _from_name(name)
    if _is_equinox_identity(spec):
        return dataclasses.replace(_from_name("identity"), fn=spec)
    name = _find(_NON_MONOTONE, spec)
    if name is not None:
        raise _refuse_non_monotone(name, spec)
    name = _find(_NON_ELEMENTWISE, spec)
    if name is not None:
        raise _refuse_non_elementwise(name)
    if isinstance(spec, functools.partial):
        inner = spec.func
        if _find(_NON_MONOTONE, inner) is not None:
            raise _refuse_non_monotone(_describe(inner), spec)
        if _find(_NON_ELEMENTWISE, inner) is not None:
            raise _refuse_non_elementwise(_describe(inner))
        return _from_partial(spec)
    return None


def _check_declared(fn: Callable, name: str) -> None:
    """Check numerically that `fn` is elementwise, finite, continuous and
    non-decreasing on a grid of 2001 points on `[-20, 20]`."""
    with jax.ensure_compile_time_eval():
        probe = jnp.asarray([-3.7, -1.2, -0.3, 0.0, 0.4, 1.9, 5.1])
        out = jnp.asarray(fn(probe))
        if out.shape != probe.shape:
            raise _refuse_non_elementwise(
                name, f" (it maps shape {probe.shape} to {out.shape})"
            )
        each = [jnp.asarray(fn(p)) for p in probe]
        if any(e.shape != () for e in each) or not np.allclose(
            np.asarray(out),
            np.stack([np.asarray(e) for e in each]),
            rtol=1e-5,
            atol=1e-6,
        ):
            raise _refuse_non_elementwise(
                name, " (its value at a point depends on the other coordinates)"
            )
        y = jnp.linspace(-20.0, 20.0, 2001)
        f, df = (np.asarray(a) for a in jax.jvp(fn, (y,), (jnp.ones_like(y),)))
    y = np.asarray(y)
    bad = ~(np.isfinite(f) & np.isfinite(df))
    if bad.any():
        raise ValueError(
            f"activation {name!r} (declared non_decreasing) is not finite, or has no "
            f"finite derivative, at y = {y[bad][0]:.6g}."
        )
    eps = float(np.finfo(f.dtype).eps)
    drop = f[1:] < f[:-1] - 8 * eps * np.maximum(np.abs(f[1:]), np.abs(f[:-1]))
    if drop.any():
        i = int(np.argmax(drop))
        raise ValueError(
            f"activation {name!r} was declared non_decreasing but decreases between "
            f"y = {y[i]:.6g} and y = {y[i + 1]:.6g} (from {f[i]:.6g} to "
            f"{f[i + 1]:.6g}); the activation flow needs a non-decreasing activation."
        )
    # A secant steeper than twice both end slopes: a jump (derivative ignores it).
    secant = np.diff(f) / np.diff(y)
    jump = secant > 2 * np.maximum(df[1:], df[:-1]) + 1e-3 * (1 + np.abs(secant))
    if jump.any():
        i = int(np.argmax(jump))
        raise ValueError(
            f"activation {name!r} jumps (is not continuous) between y = {y[i]:.6g} and "
            f"y = {y[i + 1]:.6g}; the activation flow needs a continuous activation."
        )


def activation(
    spec: "Activation | Callable | str", *, non_decreasing: bool = False
) -> Activation:
    """Read an activation for the flow model (sec. 3.4).

    **Arguments:**

    - `spec`: an `Activation` (returned as is); a name (`"relu"`, `"tanh"`, ...);
      a `jax.nn` function recognised by identity (relu, leaky_relu, relu6,
      hard_tanh, hard_sigmoid, sparse_sigmoid, identity, tanh (= `jnp.tanh`),
      sigmoid, softplus, elu, celu, selu, log_sigmoid, soft_sign, sparse_plus,
      squareplus), `functools.partial(jax.nn.leaky_relu, negative_slope=a)` with
      `a >= 0` (likewise `alpha` for elu/celu), Equinox's default MLP
      `final_activation` (the identity); or your own callable with
      `non_decreasing=True`.
    - `non_decreasing`: declare that an unrecognised callable is elementwise,
      continuous and non-decreasing. The declaration is checked on a grid of 2001
      points on `[-20, 20]`.

    **Raises:** `ValueError` for activations that are not non-decreasing (gelu,
    silu, mish, sin, abs, ...: `sigma_s` is not invertible near `s = 1`), not
    elementwise (softmax, log_softmax, ...), a false declaration, or an
    unrecognised callable without the declaration. `TypeError` for a spec that is
    neither.
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        return _from_name(spec)
    if not callable(spec):
        raise TypeError(
            f"activation expects a name, a callable or an Activation, got "
            f"{type(spec).__name__}; {_allowed()}."
        )
    known = _from_callable(spec)
    if known is not None:
        return known
    name = _describe(spec)
    if not non_decreasing:
        raise ValueError(
            f"unrecognised activation {name!r}. If it is elementwise, continuous and "
            "non-decreasing, declare it: flowjax.activation(fn, non_decreasing=True) "
            f"(checked numerically); {_allowed()}."
        )
    _check_declared(spec, name)
    return Activation(name, spec, "smooth")
