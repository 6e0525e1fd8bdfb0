"""Residual blocks for the activation stage of a refined layer (eq. 54-72).

The activation flow moves each pre-activation `y` on the straight line
`z(s) = sigma_s(y) = (1 - s) y + s sigma(y)` (eq. 35, 39). One Euler step of its
field from `s_k` to `s_{k+1}` (eq. 55) is a residual block

    z_{k+1} = z_k + ds_k (sigma - I)(w_k),    w_k ~ sigma_{s_k}^{-1}(z_k),

and the blocks here differ only in how they obtain the preimage `w_k`:

- [`HomotopyBlock`][]: the exact inverse (closed form for piecewise-linear `sigma`,
  safeguarded Newton otherwise). Exact for every grid, since each trajectory is a
  straight line at constant speed.
- [`LinearizedBlock`][]: the paper's linearization at a reference point (eq. 59-72);
  an explicit two-layer block whose error does not vanish as the grid is refined.
- [`NewtonBlock`][]: a fixed number of explicit Newton steps started from `z_k`.
- [`AugmentedBlock`][] in an [`AugmentedStage`][]: carries the preimage as a second
  state and takes one Newton step from it per block; exact to rounding, on twice
  the width.

The ReLU family uses [`LeakyReluBlock`][] with the weights of
[`relu_family_weights`][] (eq. 56-58), the other piecewise-linear activations
[`HomotopyBlock`][] with their closed-form inverse.

A stage is discretized in its own homotopy parameter (math.md sec. 6 item 1): the
grid `s_0 = 0 < s_1 < ... < s_K = 1` is uniform or the values `tau(k / K)` of a time
scaling, and block `k` steps by `ds_k = s_{k+1} - s_k`. [`homotopy_grid`][] rounds
the grid to the model's dtype first and derives `1 - s_k` and `ds_k` from the rounded
values, so that every block sees one consistent grid (the exact blocks are exact on
any grid).
"""

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from ._activations import Activation, activation_velocity
from ._resnet import AbstractBlock, AbstractStage, _scan_blocks
from ._time_scaling import TimeScaling
from ._two_layer import leading_axis_size


# The homotopy grid


class HomotopyGrid(NamedTuple):
    """Homotopy parameters of a stage of `K` steps, as NumPy arrays in the dtype of
    the model: `s` (`s_0 = 0 < ... <= s_{K-1} < s_K = 1`, shape `(K+1,)`),
    `one_minus_s` (`1 - s_k`, exact in floating point for `s_k >= 1/2`) and `ds`
    (the steps `s_{k+1} - s_k`, shape `(K,)`). All three come from the same
    rounded `s`, so every block sees one consistent grid."""

    s: np.ndarray
    one_minus_s: np.ndarray
    ds: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.s.shape[0] - 1


def homotopy_grid(
    num_steps: int, scaling: TimeScaling, dtype: Any = np.float64
) -> HomotopyGrid:
    """The grid `s_k = tau(k / K)`, `k = 0..K`, of one stage (math.md sec. 6 item 1).

    The homotopy blocks are exact on any grid, so the grid is taken as the values
    of `tau` rounded to `dtype`, with `1 - s_k` and `ds_k` computed from them. Where
    `tau(k / K)` rounds to 1 before the last point (the smooth scaling does so near
    the end of the stage: 3 of 64 points in float32, 1 in float64), `s_k` is set to
    the largest float below 1, so `1 - s_k > 0` and those blocks take steps of 0.
    The last step is exactly `1 - s_{K-1}`.
    """
    dtype = np.dtype(dtype)
    k = np.arange(num_steps + 1, dtype=np.float64)
    if scaling.name == "linear":
        tau = k / num_steps
    else:
        with jax.ensure_compile_time_eval():
            tau = np.asarray(scaling.tau(jnp.asarray(k / num_steps)), np.float64)
    one = np.asarray(1, dtype)
    below_one = one - np.asarray(jnp.finfo(dtype).epsneg, dtype)
    s = np.minimum(tau.astype(dtype), below_one)
    s = np.append(np.maximum.accumulate(s[:-1]), one)
    return HomotopyGrid(s, one - s, s[1:] - s[:-1])


def relu_family_weights(grid: HomotopyGrid, negative_slope: float) -> np.ndarray:
    """Weights `alpha_k = ds_k / (1 - s_k (1 - a))` of the exact leaky-ReLU blocks.

    Block `k` is `z + alpha_k (sigma(z) - z)` (eq. 56-58): on negatives the
    homotopy has slope `(1 - s) + a s`, so the step from `s_k` to `s_{k+1}`
    multiplies `z` by `1 - alpha_k (1 - a)` with this `alpha_k`; positives stay.
    On the uniform grid `alpha_k = 1 / (K - k (1 - a))` (`1 / (K - k)` for ReLU).
    For ReLU the last weight is exactly 1 on every grid, so the stage is `relu`
    to the last bit. Computed in the grid's dtype.
    """
    s, one_minus_s = grid.s[:-1], grid.one_minus_s[:-1]
    return grid.ds / (one_minus_s + negative_slope * s)


def leaky_slope(sigma: Activation) -> float | None:
    """The negative slope `a` in `[0, 1)` when `sigma` is ReLU or a leaky ReLU
    (one breakpoint at 0, slopes `(a, 1)`, `sigma(0) = 0`), else `None`."""
    if sigma.kind != "piecewise_linear" or sigma.breakpoints != (0.0,):
        return None
    a, c = sigma.slopes
    if c != 1.0 or sigma.value_at_zero != 0.0 or not 0.0 <= a < 1.0:
        return None
    return a


def is_identity(sigma: Activation) -> bool:
    """Whether `sigma` is the identity (then the activation stage is empty)."""
    if sigma.name == "identity":
        return True
    return (
        sigma.kind == "piecewise_linear"
        and sigma.value_at_zero == 0.0
        and all(c == 1.0 for c in sigma.slopes)
    )


# Shared pieces


def _derivative(sigma: Activation, w: Array) -> Array:
    """`sigma'(w)`, elementwise (forward mode)."""
    return jax.jvp(sigma, (w,), (jnp.ones_like(w),))[1]


def _newton_step(
    sigma: Activation, s: Array, one_minus_s: Array, z: Array, w: Array
) -> Array:
    """One Newton update `w - (sigma_s(w) - z) / J_s(w)` for `sigma_s(w) = z`.

    `J_s(w) = (1 - s) + s sigma'(w) >= 1 - s > 0` (eq. 59), with `1 - s` given
    directly.
    """
    f, df = jax.jvp(sigma, (w,), (jnp.ones_like(w),))
    residual = one_minus_s * w + s * f - z
    return w - residual / (one_minus_s + s * df)


def _block_scalars(*xs: Array, dtype: Any) -> tuple[Array, ...]:
    return tuple(jnp.asarray(x).astype(dtype) for x in xs)


# Blocks


class LeakyReluBlock(AbstractBlock):
    """`z + alpha (sigma(z) - z)` for `sigma` a leaky ReLU of negative slope `a`
    (ReLU: `a = 0`), the exact one-layer block (eq. 56-58).

    Since `sigma(z) - z = (a - 1) min(z, 0)`, the residual is computed as
    `-alpha (1 - a) min(z, 0)`: three operations per entry instead of four. For
    ReLU this equals `alpha (relu(z) - z)` bit for bit.

    **Fields:** `alpha`: the weight (scalar, or `(K,)` for a stack); `negative_slope`
    `a` in `[0, 1)` (static).
    """

    alpha: Float[Array, "*K"]
    negative_slope: float = eqx.field(static=True)

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        w = (self.alpha * (1 - self.negative_slope)).astype(y.dtype)
        return -w * jnp.minimum(y, 0)

    def chain(self, y: Float[Array, " n"], unroll: int) -> Float[Array, " n"]:
        """A stack of these blocks (leading axis `K`) applied in order to `y`.

        Every block keeps the sign of each entry and moves only the negative ones,
        each by the factor `c_k = 1 - alpha_k (1 - a)`. The stack therefore splits
        `y = p + m`, `m = min(y, 0)`, once, multiplies `m` by `c_0, ..., c_{K-1}`
        in turn (one operation per entry and block instead of three) and returns
        `p + m`. Each block rounds once either way, so the result equals `K` calls
        of the block to rounding; for ReLU the last factor is exactly 0 and the
        stack returns `relu(y)` bit for bit, with ReLU's derivative, for every `y`
        but `-inf` (which gives NaN, as `K` calls of the block do).
        """
        c = (1 - self.alpha * (1 - self.negative_slope)).astype(y.dtype)
        # Split with `where`, not `y - min(y, 0)`: its derivative at 0 is ReLU's
        # (0 for `p`), where `min` would share a tie's gradient between the parts.
        positive = y > 0
        p = jnp.where(positive, y, 0)
        m = jnp.where(positive, 0, y)

        def body(m, c_k):
            return c_k * m, None

        m = jax.lax.scan(body, m, c, unroll=max(1, min(unroll, c.shape[0])))[0]
        return p + m


class HomotopyBlock(AbstractBlock):
    """`z + ds (sigma - I)(sigma_s^{-1}(z))`: Euler on the activation flow (eq. 55).

    The preimage is exact: in closed form for a piecewise-linear `sigma` (eq. 43-47),
    by a safeguarded Newton iteration otherwise (`flowjax.sigma_s_inverse`). Since
    each point moves on a straight line at constant speed (eq. 39), `K` blocks on
    any grid reproduce `sigma` to rounding.

    **Fields:** `s`, `ds`: the block's homotopy parameter and step (scalars, or
    `(K,)` for a stack); `sigma` (static).
    """

    s: Float[Array, "*K"]
    ds: Float[Array, "*K"]
    sigma: Activation = eqx.field(static=True)

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        v = activation_velocity(self.sigma, y, self.s.astype(y.dtype))
        return self.ds.astype(y.dtype) * v


class LinearizedBlock(AbstractBlock):
    """`z + ds (sigma(a z + beta) - (a z + beta))`, the paper's block (eq. 69-72).

    `a z + beta` is the inverse of the tangent of `sigma_s` at a reference point
    `c` (eq. 63-66): a two-layer residual block with inner weight `diag(a)`, bias
    `beta` and outer weight `ds I`, plus the diagonal linear term `-ds (a z + beta)`
    (eq. 71). The linearization error (eq. 68) does not shrink with `ds`: refining
    the grid converges to a different flow, not to `sigma` (math.md sec. 6 item 6).

    **Fields:** `a`, `beta`, `ds`: scalars, or `(K,)` for a stack; `sigma` (static).
    """

    a: Float[Array, "*K"]
    beta: Float[Array, "*K"]
    ds: Float[Array, "*K"]
    sigma: Activation = eqx.field(static=True)

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        w = self.a.astype(y.dtype) * y + self.beta.astype(y.dtype)
        return self.ds.astype(y.dtype) * (self.sigma(w) - w)


def linearized_coefficients(
    sigma: Activation, grid: HomotopyGrid, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """`a_k = 1 / J_{s_k}(c)` and `beta_k = c - a_k sigma_{s_k}(c)`, `k = 0..K-1`
    (eq. 63-67), for the reference point `c`."""
    with jax.ensure_compile_time_eval():
        c_arr = jnp.asarray(c, jnp.result_type(float))
        f_c = float(sigma(c_arr))
        df_c = float(_derivative(sigma, c_arr))
    s, one_minus_s = grid.s[:-1], grid.one_minus_s[:-1]
    a = 1.0 / (one_minus_s + s * df_c)
    beta = c - a * (one_minus_s * c + s * f_c)
    return a, beta


class NewtonBlock(AbstractBlock):
    """`z + ds (sigma(w) - w)` with `w` from `num_newton` Newton steps for
    `sigma_s(w) = z` started at `w = z` (sec. 4.4).

    A fixed, explicit network: no loop that depends on values. The error of the
    preimage, hence of the stage, levels off as the grid is refined and falls with
    `num_newton` (math.md sec. 6 item 6).

    **Fields:** `s`, `one_minus_s`, `ds`: scalars, or `(K,)` for a stack; `sigma`
    and `num_newton` (static).
    """

    s: Float[Array, "*K"]
    one_minus_s: Float[Array, "*K"]
    ds: Float[Array, "*K"]
    sigma: Activation = eqx.field(static=True)
    num_newton: int = eqx.field(static=True)

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        s, one_minus_s, ds = _block_scalars(
            self.s, self.one_minus_s, self.ds, dtype=y.dtype
        )
        w = y
        for _ in range(self.num_newton):
            w = _newton_step(self.sigma, s, one_minus_s, y, w)
        return ds * (self.sigma(w) - w)


class AugmentedBlock(eqx.Module):
    """A residual block on the pair `(z, w)`: twice the width of the layer.

    `w` carries the preimage of `z` from the previous block, which by eq. 39 is the
    same `y` at every step, so one Newton step from it solves `sigma_s(w) = z` to
    rounding (sec. 4.4):

        w_+ = w - (sigma_s(w) - z) / J_s(w),    z_+ = z + ds (sigma(w_+) - w_+).

    Both increments are explicit functions of `(z, w)`, so the block is the identity
    plus a residual on `R^{2n}`.

    **Fields:** `s`, `one_minus_s`, `ds`: scalars, or `(K,)` for a stack; `sigma`
    (static).
    """

    s: Float[Array, "*K"]
    one_minus_s: Float[Array, "*K"]
    ds: Float[Array, "*K"]
    sigma: Activation = eqx.field(static=True)

    def residual(
        self, state: tuple[Float[Array, " n"], Float[Array, " n"]]
    ) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
        """The increments `(z_+ - z, w_+ - w)`."""
        z, w = state
        s, one_minus_s, ds = _block_scalars(
            self.s, self.one_minus_s, self.ds, dtype=z.dtype
        )
        w_new = _newton_step(self.sigma, s, one_minus_s, z, w)
        return ds * (self.sigma(w_new) - w_new), w_new - w

    def __call__(
        self, state: tuple[Float[Array, " n"], Float[Array, " n"]]
    ) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
        dz, dw = self.residual(state)
        z, w = state
        return (z + dz).astype(z.dtype), (w + dw).astype(w.dtype)


DEFAULT_UNROLL = 4

# A leaky-ReLU block costs one multiplication per entry in a stack (see
# `LeakyReluBlock.chain`): unrolling 32 of them lets the compiler fuse them into one
# pass over the data, while compile time still does not grow with `K`.
LEAKY_RELU_UNROLL = 32


class ActivationStage(AbstractStage):
    """`K` activation blocks of one kind, scanned: `y <- y + r_k(y)` (eq. 54-72).

    Like `flowjax._resnet.Stage`, but the scan is unrolled by `unroll` blocks, so
    that the compiler fuses a few cheap elementwise blocks into one pass over the
    data (compile time still does not grow with `K`).

    **Arguments:** `blocks`: one `AbstractBlock` whose arrays have leading axis `K`;
    `unroll`: blocks per scan iteration (static).
    """

    blocks: AbstractBlock
    unroll: int = eqx.field(static=True)
    _depth: int = eqx.field(static=True)

    def __init__(self, blocks: AbstractBlock, *, unroll: int = DEFAULT_UNROLL):
        self._depth = leading_axis_size(
            blocks, f"ActivationStage: {type(blocks).__name__}"
        )
        self.blocks = blocks
        self.unroll = unroll

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def block_kind(self) -> str:
        return type(self.blocks).__name__

    def block(self, k: int) -> AbstractBlock:
        """Block `k` on its own."""
        return jtu.tree_map(lambda a: a[k] if eqx.is_array(a) else a, self.blocks)

    def __call__(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        unroll = max(1, min(self.unroll, self._depth))
        if isinstance(self.blocks, LeakyReluBlock):
            return self.blocks.chain(y, unroll)

        def body(y, block):
            return block(y), None

        return jax.lax.scan(body, y, self.blocks, unroll=unroll)[0]


class AugmentedStage(AbstractStage):
    """`K` [`AugmentedBlock`][]s: the activation stage exact to rounding, at twice
    the width.

    On entry the state `z` (the pre-activation `y`) is lifted to `(z, w) = (y, y)`;
    the blocks act on `R^{2n}`; on exit the stage returns `z`. The lift and the
    projection are copies, not learned maps.
    """

    blocks: AugmentedBlock
    _depth: int = eqx.field(static=True)

    def __init__(self, blocks: AugmentedBlock):
        self._depth = leading_axis_size(blocks, "AugmentedStage: blocks")
        self.blocks = blocks

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def block_kind(self) -> str:
        return "AugmentedBlock"

    @property
    def width_factor(self) -> int:
        """The blocks act on `(z, w)`: twice the width of the layer."""
        return 2

    def __call__(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self.trajectory_pairs(y, save_all=False)[0]

    def trajectory_pairs(self, y: Array, save_all: bool = True) -> Any:
        """The states `(z_k, w_k)`, stacked when `save_all` (`k = 0..K`)."""

        def step(state, block):
            dz, dw = block.residual(state)
            return jtu.tree_map(jnp.add, state, (dz, dw))

        return _scan_blocks(
            step, (y, y), self.blocks, checkpoint=False, save_all=save_all
        )


def augmented_blocks(
    sigma: Activation, grid: HomotopyGrid, dtype: Any
) -> AugmentedBlock:
    """The stacked blocks of an [`AugmentedStage`][] on `grid`."""
    s, one_minus_s, ds = _stack(
        grid.s[:-1], grid.one_minus_s[:-1], grid.ds, dtype=dtype
    )
    return AugmentedBlock(s, one_minus_s, ds, sigma)


def _stack(*xs: np.ndarray, dtype: Any) -> tuple[Array, ...]:
    return tuple(jnp.asarray(x, dtype=dtype) for x in xs)


def newton_blocks(
    sigma: Activation, grid: HomotopyGrid, num_newton: int, dtype: Any
) -> NewtonBlock:
    """The stacked [`NewtonBlock`][]s of a stage on `grid`."""
    s, one_minus_s, ds = _stack(
        grid.s[:-1], grid.one_minus_s[:-1], grid.ds, dtype=dtype
    )
    return NewtonBlock(s, one_minus_s, ds, sigma, num_newton)


def homotopy_blocks(sigma: Activation, grid: HomotopyGrid, dtype: Any) -> HomotopyBlock:
    """The stacked [`HomotopyBlock`][]s of a stage on `grid`."""
    s, ds = _stack(grid.s[:-1], grid.ds, dtype=dtype)
    return HomotopyBlock(s, ds, sigma)


def linearized_blocks(
    sigma: Activation, grid: HomotopyGrid, c: float, dtype: Any
) -> LinearizedBlock:
    """The stacked [`LinearizedBlock`][]s of a stage on `grid`, reference point `c`."""
    if not math.isfinite(c):
        raise ValueError(f"reference_point must be a finite number, got {c!r}.")
    a, beta = linearized_coefficients(sigma, grid, c)
    a_k, beta_k, ds = _stack(a, beta, grid.ds, dtype=dtype)
    return LinearizedBlock(a_k, beta_k, ds, sigma)
