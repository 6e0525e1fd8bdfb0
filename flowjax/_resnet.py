"""Euler ResNets: residual networks as fixed-step Euler discretizations (eq. 10-17).

Two layers of abstraction, both iterated with `jax.lax.scan` so that compile time
and memory do not grow with the number of blocks:

- [`EulerResNet`][]: `y_{k+1} = y_k + dt_k f(t_k, y_k, args_k)` for any velocity
  field `f` with diffrax's signature, `args_k` being block `k` of a stacked PyTree.
  Its continuous counterpart [`NeuralFlow`][] and the conversions both ways
  ([`resnet_to_flow`][], [`flow_to_resnet`][]) are in `_neural_flow.py`.
- Residual blocks `y + r_k(y)` of the kinds the theory produces (eq. 17, 52-53,
  56-58), grouped in *stages*: a [`Stage`][] is a scanned stack of blocks of one
  kind; [`LinearStage`][], [`StretchStage`][] and [`TranslationStage`][] are tied
  stages storing their generator once; [`LinearMap`][] is the non-residual map of
  the "whole" option. A [`Chain`][] applies stages in order.

Every stage reports `depth` (number of residual blocks), `block_kind` and
`num_params`; a chain reports `block_counts()` as well.
"""

import abc
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from ._two_layer import (
    TwoLayerParams,
    _float_dtype,
    check_time_grid,
    leading_axis_size,
    two_layer_velocity,
    uniform_grid,
)


# Counting


def parameter_count(tree: PyTree) -> int:
    """Sum of the sizes of the array leaves of `tree` (time grids included)."""
    return sum(int(np.prod(jnp.shape(x))) for x in _arrays(tree))


def storage_bytes(tree: PyTree) -> int:
    """Sum of the byte sizes of the array leaves of `tree`."""
    return sum(int(np.prod(jnp.shape(x))) * x.dtype.itemsize for x in _arrays(tree))


def _arrays(tree: PyTree) -> list[Any]:
    return [x for x in jtu.tree_leaves(tree) if eqx.is_array(x)]


# Stages


class AbstractStage(eqx.Module):
    """A piece of a residual network: `depth` residual blocks applied in order.

    Subclasses implement `__call__(y)`, `depth` and `block_kind`. A non-residual
    piece ([`LinearMap`][]) has `depth == 0` and `is_residual == False`.
    """

    @abc.abstractmethod
    def __call__(self, y: PyTree[Array]) -> PyTree[Array]:
        """Apply the stage to one input (vmap for a batch)."""

    @property
    @abc.abstractmethod
    def depth(self) -> int:
        """The number of residual blocks."""

    @property
    @abc.abstractmethod
    def block_kind(self) -> str:
        """The name of the kind of block the stage is made of."""

    @property
    def is_residual(self) -> bool:
        """Whether every block is identity plus an explicit residual."""
        return True

    @property
    def num_blocks(self) -> int:
        """Blocks counted in `block_counts`: `depth`, or 1 for a non-residual map."""
        return self.depth if self.is_residual else 1

    @property
    def num_params(self) -> int:
        """Sum of the sizes of the stage's arrays."""
        return parameter_count(self)

    def block_counts(self) -> dict[str, int]:
        """`{block_kind: number of blocks}`."""
        return {self.block_kind: self.num_blocks}


def _scan_blocks(
    step: Callable[[Any, Any], Any],
    y0: PyTree[Array],
    xs: PyTree[Array],
    *,
    checkpoint: bool,
    save_all: bool,
) -> PyTree[Array]:
    """Iterate `y <- step(y, x_k)` over the leading axis of `xs` with `lax.scan`.

    Returns the last state, or with `save_all` all states stacked along a new
    leading axis (the input first, length `K+1`).
    """

    def body(y, x):
        y_next = jtu.tree_map(lambda a, b: b.astype(a.dtype), y, step(y, x))
        return y_next, (y_next if save_all else None)

    if checkpoint:
        body = jax.checkpoint(body)
    y_last, ys = jax.lax.scan(body, y0, xs)
    if not save_all:
        return y_last
    return jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)


def _step_sizes(ts: Array) -> Array:
    return ts[1:] - ts[:-1]


def _grid_or_uniform(
    ts: Real[ArrayLike, " num_times"] | None,
    num_steps: int,
    what: str,
    dtype: Any = None,
) -> Array:
    if ts is None:
        return uniform_grid(num_steps, dtype=dtype)
    ts = jnp.asarray(ts)
    check_time_grid(ts, what, num_steps=num_steps)
    return ts


class EulerResNet(AbstractStage):
    """Euler's method on a velocity field, as a residual network (eq. 10-13).

    $y_{k+1} = y_k + \\Delta t_k\\, f(t_k, y_k, \\mathrm{args}_k)$ for
    `k = 0..K-1`, where `args_k` is block `k` of the stacked `params` (leading
    axis `K`) and `dt_k = t_{k+1} - t_k`. With `f = TwoLayerField(sigma)` and a
    stacked [`TwoLayerParams`][] each step is the two-layer block (eq. 17).

    **Arguments:**

    - `field`: `f(t, y, args)`, diffrax's signature; `y` may be any PyTree of
      arrays. A Module's arrays are trained with it; a plain function is static
      (use `eqx.filter_jit`, `eqx.filter_grad` on the ResNet).
    - `params`: PyTree of arrays with leading axis `K` (block `k`'s `args` is
      its slice `k`), or `None` when `f` takes no per-block arguments.
    - `ts`: time grid `t_0 < ... < t_K`, shape `(K+1,)`; default uniform on
      `[0, 1]`. Needed when `params` is `None`.
    - `checkpoint`: wrap each step in `jax.checkpoint` (less memory in the
      backward pass, one extra field evaluation per block).

    Call it on one state: `resnet(y0) -> y_K`; `resnet.trajectory(y0)` returns
    all states `y_0..y_K` stacked along a new leading axis.
    """

    field: Callable[..., PyTree[Array]]
    params: PyTree[Array]
    ts: Real[Array, " num_times"]
    checkpoint: bool = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., PyTree[Array]],
        params: PyTree[Array] = None,
        ts: Real[ArrayLike, " num_times"] | None = None,
        *,
        checkpoint: bool = False,
    ):
        if params is None and ts is None:
            raise ValueError(
                "EulerResNet: give the block parameters `params` (leading axis = "
                "number of blocks) or the time grid `ts` (or both)"
            )
        if params is None:
            ts = jnp.asarray(ts)
            check_time_grid(ts, "EulerResNet: ts")
        else:
            num_steps = leading_axis_size(params, "EulerResNet: params")
            dtype = _float_dtype(params)
            ts = _grid_or_uniform(ts, num_steps, "EulerResNet: ts", dtype)
        self.field = field
        self.params = params
        self.ts = ts
        self.checkpoint = checkpoint

    @property
    def depth(self) -> int:
        return self.ts.shape[-1] - 1

    @property
    def block_kind(self) -> str:
        return f"Euler[{type(self.field).__name__}]"

    def __call__(self, y: PyTree[Array]) -> PyTree[Array]:
        return self._run(y, save_all=False)

    def trajectory(self, y: PyTree[Array]) -> PyTree[Array]:
        """All states `y_0, ..., y_K`, stacked along a new leading axis."""
        return self._run(y, save_all=True)

    def _run(self, y: PyTree[Array], save_all: bool) -> PyTree[Array]:
        def step(y, x):
            t, dt, args = x
            v = self.field(t, y, args)
            return jtu.tree_map(lambda a, b: a + dt.astype(a.dtype) * b, y, v)

        xs = (self.ts[:-1], _step_sizes(self.ts), self.params)
        return _scan_blocks(step, y, xs, checkpoint=self.checkpoint, save_all=save_all)


# Residual blocks


class AbstractBlock(eqx.Module):
    """One residual block `y -> y + residual(y)`; stacked along a leading axis, a
    Module of this kind holds all blocks of a [`Stage`][]."""

    @abc.abstractmethod
    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        """The increment `r(y)`, step size included."""

    def __call__(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return (y + self.residual(y)).astype(y.dtype)


class TwoLayerBlock(AbstractBlock):
    """`y + dt (W2 sigma(W1 y + b1) + b2)` (eq. 17).

    `params`: a [`TwoLayerParams`][]; `dt`: the step (scalar, or `(K,)` for a
    stack); `sigma`: elementwise activation (static).
    """

    params: TwoLayerParams
    dt: Float[Array, "*K"]
    sigma: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        params: TwoLayerParams,
        dt: Float[ArrayLike, "*K"],
        sigma: Callable[[Array], Array],
    ):
        self.params = params
        self.dt = jnp.asarray(dt)
        self.sigma = sigma

    def velocity(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        """`W2 sigma(W1 y + b1) + b2` (eq. 2)."""
        return two_layer_velocity(self.params, y, self.sigma)

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self.dt.astype(y.dtype) * self.velocity(y)


class LinearBlock(AbstractBlock):
    """`y + W y` with a per-block weight `W: (n, n)` (eq. 52-53, untied)."""

    W: Float[Array, "*K n n"]

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self.W @ y


class DiagonalBlock(AbstractBlock):
    """`y + d * y` with a per-block diagonal weight `d: (n,)` (stretch, eq. 21-22)."""

    d: Float[Array, "*K n"]

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self.d * y


class TranslationBlock(AbstractBlock):
    """`y + b` with a per-block translation `b: (n,)`."""

    b: Float[Array, "*K n"]

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return jnp.broadcast_to(self.b, jnp.shape(y))


class ActivationBlock(AbstractBlock):
    """`y + alpha (sigma(y) - y)` with a scalar weight `alpha` (eq. 56-58).

    For the ReLU family on the uniform homotopy grid, [`homotopy_weights`][]
    gives the weights that make a stage of `K` blocks equal `sigma` exactly.
    """

    alpha: Float[Array, "*K"]
    sigma: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, alpha: Float[ArrayLike, "*K"], sigma: Callable[[Array], Array]):
        self.alpha = jnp.asarray(alpha)
        self.sigma = sigma

    def residual(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self.alpha.astype(y.dtype) * (self.sigma(y) - y)


def homotopy_weights(
    num_steps: int, *, negative_slope: float = 0.0, dtype: Any = None
) -> Float[Array, " K"]:
    """Weights `alpha_k = 1 / (K - k (1 - a))`, `k = 0..K-1` (eq. 56-58).

    Euler's method with `K` uniform steps of the homotopy (eq. 34-36) of the
    leaky ReLU of negative slope `a` (`a = 0`: ReLU). The weights telescope, so
    the stage is exact for every `K >= 1`: `z_K = sigma(y)`. The last weight is
    exactly 1, which makes the ReLU stage bitwise equal to `relu`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise TypeError(
            f"homotopy_weights: num_steps must be an int, got {num_steps!r}"
        )
    if num_steps < 1:
        raise ValueError(f"homotopy_weights: num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= negative_slope < 1.0:
        raise ValueError(
            f"homotopy_weights: negative_slope must be in [0, 1), got {negative_slope}"
        )
    k = np.arange(num_steps, dtype=np.float64)
    alpha = 1.0 / (num_steps - k * (1.0 - negative_slope))
    return jnp.asarray(alpha, dtype=jnp.result_type(float) if dtype is None else dtype)


class Stage(AbstractStage):
    """A scanned stack of `K` residual blocks of one kind: `y <- y + r_k(y)`.

    **Arguments:**

    - `blocks`: one [`AbstractBlock`][] whose arrays have leading axis `K`
      (build it with `Stage.from_blocks([...])` from separate blocks).
    - `checkpoint`: wrap each block in `jax.checkpoint`.
    """

    blocks: AbstractBlock
    checkpoint: bool = eqx.field(static=True)
    # Static, so that a vmapped stack of stages still reports its own depth.
    _depth: int = eqx.field(static=True)

    def __init__(self, blocks: AbstractBlock, *, checkpoint: bool = False):
        if not isinstance(blocks, AbstractBlock):
            raise TypeError(
                f"Stage: blocks must be an AbstractBlock, got {type(blocks).__name__}"
            )
        self._depth = leading_axis_size(blocks, f"Stage: {type(blocks).__name__}")
        self.blocks = blocks
        self.checkpoint = checkpoint

    @classmethod
    def from_blocks(
        cls, blocks: Sequence[AbstractBlock], *, checkpoint: bool = False
    ) -> "Stage":
        """Stack separate blocks of one kind (equal static fields) into a stage."""
        if len(blocks) == 0:
            raise ValueError("Stage.from_blocks: need at least one block")
        treedefs = {jtu.tree_structure(b) for b in blocks}
        if len(treedefs) != 1:
            kinds = sorted({type(b).__name__ for b in blocks})
            raise ValueError(
                "Stage.from_blocks: blocks must be of one kind with equal static "
                f"fields (e.g. the same sigma); got kinds {kinds}"
            )
        stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *blocks)
        return cls(stacked, checkpoint=checkpoint)

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
        return self._run(y, save_all=False)

    def trajectory(self, y: Float[Array, " n"]) -> Float[Array, "num_times n"]:
        """All states `y_0, ..., y_K`, shape `(K+1, n)`."""
        return self._run(y, save_all=True)

    def _run(self, y: Array, save_all: bool) -> Array:
        def step(y, block):
            return y + block.residual(y)

        return _scan_blocks(
            step, y, self.blocks, checkpoint=self.checkpoint, save_all=save_all
        )


# Tied stages: one generator, a per-block coefficient


class AbstractTiedStage(AbstractStage):
    """`K` blocks sharing one generator, block `k` scaled by `w_k = dt_k c_k`.

    Storage is the generator once plus `K` coefficients and the grid, so it does
    not grow as `K` times the generator. `untie()` returns the equivalent
    [`Stage`][] with per-block weights materialised (stacked for scan), for
    further training.
    """

    c: eqx.AbstractVar[Float[Array, " K"]]
    ts: eqx.AbstractVar[Real[Array, " num_times"]]
    checkpoint: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def _block(self, w: Array) -> AbstractBlock:
        """Block with step weight `w` (scalar, or `(K,)` for the stack)."""

    def _residual(self, w: Array, y: Array) -> Array:
        """The residual of the block with step weight `w` (a scalar)."""
        return self._block(w).residual(y)

    @property
    def depth(self) -> int:
        return self.c.shape[-1]

    @property
    def weights(self) -> Float[Array, " K"]:
        """Per-block step weights `w_k = (t_{k+1} - t_k) c_k`."""
        return _step_sizes(self.ts) * self.c

    def untie(self) -> Stage:
        """The same blocks with per-block weights stored separately."""
        return Stage(self._block(self.weights), checkpoint=self.checkpoint)

    def __call__(self, y: Float[Array, " n"]) -> Float[Array, " n"]:
        return self._run(y, save_all=False)

    def trajectory(self, y: Float[Array, " n"]) -> Float[Array, "num_times n"]:
        """All states `y_0, ..., y_K`, shape `(K+1, n)`."""
        return self._run(y, save_all=True)

    def _run(self, y: Array, save_all: bool) -> Array:
        def step(y, w):
            return y + self._residual(w, y)

        return _scan_blocks(
            step, y, self.weights, checkpoint=self.checkpoint, save_all=save_all
        )


def _tied_inputs(c: ArrayLike, ts: ArrayLike | None, what: str) -> tuple[Array, Array]:
    c = jnp.asarray(c)
    if c.ndim != 1 or c.shape[0] < 1:
        raise ValueError(f"{what}: c must have shape (K,) with K >= 1, got {c.shape}")
    return c, _grid_or_uniform(ts, c.shape[0], f"{what}: ts", _float_dtype(c))


class LinearStage(AbstractTiedStage):
    """`K` linear blocks `y + dt_k c_k G y` sharing the generator `G` (eq. 51-53).

    **Arguments:**

    - `G`: the generator, shape `(n, n)` (e.g. a skew-symmetric `Q` or `P`).
    - `c`: per-block coefficients, shape `(K,)`: ones for the plain flow
      `y' = G y` on `[0, 1]`; for steps that follow a time scaling `tau`, the
      increments `c_k = (tau(s_{k+1}) - tau(s_k)) / dt_k` on the uniform grid.
    - `ts`: the stage's grid `s_0 < ... < s_K`; default uniform on `[0, 1]`.
    - `checkpoint`: wrap each block in `jax.checkpoint`.

    `K` blocks approximate `exp(G sum_k dt_k c_k)` to `O(1/K)`.
    """

    G: Float[Array, "n n"]
    c: Float[Array, " K"]
    ts: Real[Array, " num_times"]
    checkpoint: bool = eqx.field(static=True)

    def __init__(
        self,
        G: Float[ArrayLike, "n n"],
        c: Float[ArrayLike, " K"],
        ts: Real[ArrayLike, " num_times"] | None = None,
        *,
        checkpoint: bool = False,
    ):
        G = jnp.asarray(G)
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"LinearStage: G must be square (n, n), got {G.shape}")
        self.G = G
        self.c, self.ts = _tied_inputs(c, ts, "LinearStage")
        self.checkpoint = checkpoint

    @property
    def block_kind(self) -> str:
        return "LinearBlock"

    def _block(self, w: Array) -> LinearBlock:
        return LinearBlock(jnp.expand_dims(w, (-1, -2)) * self.G)

    def _residual(self, w: Array, y: Array) -> Array:
        # w (G y) rather than (w G) y: a matrix-vector product per block.
        return w.astype(y.dtype) * (self.G @ y)


StretchScheme = Literal["explicit", "implicit", "exact"]
_STRETCH_SCHEMES = ("explicit", "implicit", "exact")


class StretchStage(AbstractTiedStage):
    """`K` diagonal blocks for the stretch flow `y' = c(s) lam * y` (eq. 21-22, 53).

    With `w_k = dt_k c_k`, block `k` is `y + d_k * y` where

    - `scheme="explicit"`: `d_k = w_k lam` (explicit Euler; stable only while
      `w_k |lam| < 2`, i.e. `K >= kappa / 2` for `lam = -kappa`);
    - `scheme="implicit"` (default): for contracting directions `lam < 0` the
      implicit step `y <- y / (1 - w_k lam)`, written as the explicit residual
      `d_k = w_k lam / (1 - w_k lam)`; for `lam >= 0` the explicit step (stable
      there, while the implicit one would need `w_k lam < 1`). Both first order,
      and stable for every `K`: `|d_k| <= 1` on contracting directions;
    - `scheme="exact"`: `d_k = exp(w_k lam) - 1`, so the stage equals
      `exp(lam sum_k w_k) * y` up to rounding.

    **Arguments:** `lam: (n,)`, `c: (K,)`, `ts` (default uniform on `[0, 1]`),
    `scheme`, `checkpoint`.
    """

    lam: Float[Array, " n"]
    c: Float[Array, " K"]
    ts: Real[Array, " num_times"]
    scheme: StretchScheme = eqx.field(static=True)
    checkpoint: bool = eqx.field(static=True)

    def __init__(
        self,
        lam: Float[ArrayLike, " n"],
        c: Float[ArrayLike, " K"],
        ts: Real[ArrayLike, " num_times"] | None = None,
        *,
        scheme: StretchScheme = "implicit",
        checkpoint: bool = False,
    ):
        if scheme not in _STRETCH_SCHEMES:
            raise ValueError(
                f"StretchStage: scheme={scheme!r} is not supported; use one of "
                f"{_STRETCH_SCHEMES}"
            )
        lam = jnp.asarray(lam)
        if lam.ndim != 1:
            raise ValueError(f"StretchStage: lam must have shape (n,), got {lam.shape}")
        self.lam = lam
        self.c, self.ts = _tied_inputs(c, ts, "StretchStage")
        self.scheme = scheme
        self.checkpoint = checkpoint

    @property
    def block_kind(self) -> str:
        return "DiagonalBlock"

    def _block(self, w: Array) -> DiagonalBlock:
        return DiagonalBlock(stretch_residual_weight(self.lam, w, self.scheme))


def stretch_residual_weight(
    lam: Float[Array, " n"], w: Float[Array, "*K"], scheme: StretchScheme
) -> Float[Array, "*K n"]:
    """Diagonal residual weight `d` of one stretch step of size `w` (eq. 21-22).

    See [`StretchStage`][] for the three schemes. `w` may carry leading axes.
    """
    wl = jnp.expand_dims(w, -1) * lam
    if scheme == "explicit":
        return wl
    if scheme == "exact":
        return jnp.expm1(wl)
    # Implicit Euler where lam < 0 (math.md sec. 6 item 5); the safe denominator
    # keeps the unused branch of the where finite for lam >= 0.
    contracting = lam < 0
    denominator = jnp.where(contracting, 1 - wl, 1)
    return jnp.where(contracting, wl / denominator, wl)


class TranslationStage(AbstractTiedStage):
    """`K` blocks `y + dt_k c_k b` sharing the translation `b: (n,)` (eq. 24-33).

    **Arguments:** `b: (n,)`, `c: (K,)`, `ts` (default uniform on `[0, 1]`),
    `checkpoint`. The stage adds `(sum_k dt_k c_k) b`.
    """

    b: Float[Array, " n"]
    c: Float[Array, " K"]
    ts: Real[Array, " num_times"]
    checkpoint: bool = eqx.field(static=True)

    def __init__(
        self,
        b: Float[ArrayLike, " n"],
        c: Float[ArrayLike, " K"],
        ts: Real[ArrayLike, " num_times"] | None = None,
        *,
        checkpoint: bool = False,
    ):
        b = jnp.asarray(b)
        if b.ndim != 1:
            raise ValueError(f"TranslationStage: b must have shape (n,), got {b.shape}")
        self.b = b
        self.c, self.ts = _tied_inputs(c, ts, "TranslationStage")
        self.checkpoint = checkpoint

    @property
    def block_kind(self) -> str:
        return "TranslationBlock"

    def _block(self, w: Array) -> TranslationBlock:
        return TranslationBlock(jnp.expand_dims(w, -1) * self.b)


class LinearMap(AbstractStage):
    """The affine map `y -> W y + b`: NOT a residual block (the "whole" option).

    `W: (m, d)`, `b: (m,)` or `None`. It has `depth == 0`, `is_residual ==
    False`, and counts as one `"LinearMap"` in `block_counts`.
    """

    W: Float[Array, "m d"]
    b: Float[Array, " m"] | None

    def __init__(self, W: Float[ArrayLike, "m d"], b: Float[ArrayLike, " m"] | None):
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"LinearMap: W must be a matrix (m, d), got {W.shape}")
        if b is not None:
            b = jnp.asarray(b)
            if b.shape != W.shape[:1]:
                raise ValueError(
                    f"LinearMap: b has shape {b.shape}, expected ({W.shape[0]},) "
                    f"for W of shape {W.shape}"
                )
        self.W = W
        self.b = b

    @property
    def depth(self) -> int:
        return 0

    @property
    def block_kind(self) -> str:
        return "LinearMap"

    @property
    def is_residual(self) -> bool:
        return False

    def __call__(self, y: Float[Array, " d"]) -> Float[Array, " m"]:
        out = self.W @ y if self.b is None else self.W @ y + self.b
        return out.astype(y.dtype)


class Chain(AbstractStage):
    """Stages applied in order: a refined network (a sequence of stages).

    `depth` is the total number of residual blocks; `block_counts()` maps each
    block kind to its count (a [`LinearMap`][] counts once, not in `depth`);
    `num_params` sums the sizes of all arrays. Serialises with
    `eqx.tree_serialise_leaves`.
    """

    stages: tuple[AbstractStage, ...]

    def __init__(self, stages: Sequence[AbstractStage]):
        for i, stage in enumerate(stages):
            if not isinstance(stage, AbstractStage):
                raise TypeError(
                    f"Chain: stage {i} is a {type(stage).__name__}; every stage must "
                    "be an AbstractStage (EulerResNet, Stage, LinearStage, "
                    "StretchStage, TranslationStage, LinearMap, Chain)"
                )
        self.stages = tuple(stages)

    @property
    def depth(self) -> int:
        return sum(stage.depth for stage in self.stages)

    @property
    def block_kind(self) -> str:
        return "Chain"

    @property
    def num_blocks(self) -> int:
        return sum(stage.num_blocks for stage in self.stages)

    def block_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for stage in self.stages:
            for kind, count in stage.block_counts().items():
                counts[kind] = counts.get(kind, 0) + count
        return counts

    def __call__(self, y: PyTree[Array]) -> PyTree[Array]:
        for stage in self.stages:
            y = stage(y)
        return y
