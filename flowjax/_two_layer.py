"""The time-dependent two-layer velocity field of the flow model (eq. 2, 14-17).

A velocity field here has diffrax's signature `f(t, y, args)`, and `args` carries
the parameters: for [`TwoLayerField`][] it is either one parameter set
[`TwoLayerParams`][] (fixed in time, e.g. one residual block) or a callable
`t -> TwoLayerParams` such as [`GridParams`][] (parameters that vary in time). The
same field object therefore serves the Euler ResNet (which passes block `k`'s
parameters) and the adaptive solve (which passes the time-dependent parameters).
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real


Interpolation = Literal["constant", "linear"]
_INTERPOLATIONS = ("constant", "linear")


class TwoLayerParams(eqx.Module):
    """One parameter set of the two-layer field (eq. 2), or a stack of them.

    `W1: (..., m, n)`, `b1: (..., m)`, `W2: (..., n, m)`, `b2: (..., n)`, where `n`
    is the state dimension, `m` the hidden width and `...` optional leading axes
    shared by all four arrays (a stack of `L` blocks has leading shape `(L,)`).
    """

    W1: Float[Array, "*L m n"]
    b1: Float[Array, "*L m"]
    W2: Float[Array, "*L n m"]
    b2: Float[Array, "*L n"]

    def __check_init__(self):
        _check_two_layer_shapes(self.W1, self.b1, self.W2, self.b2)

    @property
    def state_dim(self) -> int:
        """`n`, the dimension of the state the field moves."""
        return self.W1.shape[-1]

    @property
    def hidden_dim(self) -> int:
        """`m`, the number of hidden units."""
        return self.W1.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading axes, `(L,)` for a stack of `L` blocks, `()` for one set."""
        return self.W1.shape[:-2]

    @classmethod
    def init(
        cls,
        n: int,
        m: int,
        *,
        key: PRNGKeyArray,
        num_blocks: int | None = None,
        dtype: Any = None,
        scale: float = 0.1,
    ) -> "TwoLayerParams":
        """Random parameters for training.

        `W1 ~ N(0, 1/n)` and `b1 ~ N(0, 1)` place the hidden units' hyperplanes at
        unit distance from the origin; `W2 ~ scale * N(0, 1/m)` and `b2 = 0` keep
        the velocity small, so a ResNet starts near the identity map.

        **Arguments:**

        - `n`, `m`: state dimension and hidden width (positive integers).
        - `key`: a JAX PRNG key.
        - `num_blocks`: if given, a stack of that many independent sets (leading
          axis `num_blocks`), as held by an Euler ResNet or a [`GridParams`][].
        - `dtype`: floating dtype (default: JAX's default float).
        - `scale`: size of the outer weights.
        """
        for name, value in (("n", n), ("m", m)):
            _check_positive_int(f"TwoLayerParams.init: {name}", value)
        lead = () if num_blocks is None else (num_blocks,)
        if num_blocks is not None:
            _check_positive_int("TwoLayerParams.init: num_blocks", num_blocks)
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        k1, k2, k3 = jr.split(key, 3)
        W1 = jr.normal(k1, (*lead, m, n), dtype) / n**0.5
        b1 = jr.normal(k2, (*lead, m), dtype)
        W2 = scale * jr.normal(k3, (*lead, n, m), dtype) / m**0.5
        b2 = jnp.zeros((*lead, n), dtype)
        return cls(W1, b1, W2, b2)


def two_layer_velocity(
    params: TwoLayerParams,
    y: Float[Array, " n"],
    sigma: Callable[[Array], Array],
) -> Float[Array, " n"]:
    """The two-layer velocity `W2 sigma(W1 y + b1) + b2` (eq. 2) at one state.

    **Arguments:**

    - `params`: one parameter set (no leading axes).
    - `y`: the state, shape `(n,)`.
    - `sigma`: an elementwise activation.

    **Returns:** the velocity, shape `(n,)`.
    """
    if params.batch_shape != ():
        raise ValueError(
            "two_layer_velocity needs one parameter set, got a stack with leading "
            f"shape {params.batch_shape}; index one block or vmap over the stack"
        )
    if jnp.shape(y) != (params.state_dim,):
        raise ValueError(
            f"two_layer_velocity: state y has shape {jnp.shape(y)}, expected "
            f"({params.state_dim},) to match W1 of shape {params.W1.shape}; vmap "
            "over a batch of states"
        )
    # Row form `y W1^T`: under `vmap` the batch stays the leading axis of each
    # product, with no transposes between the blocks of a ResNet.
    h = sigma(y @ params.W1.T + params.b1)
    return h @ params.W2.T + params.b2


class GridParams(eqx.Module):
    """Parameters on a time grid: a callable `t -> params` (eq. 14-17).

    Holds a stack of `L` parameter sets (any PyTree of arrays with leading axis
    `L`, typically a [`TwoLayerParams`][]) and a grid `t_0 < t_1 < ... < t_L`.

    - `interpolation="constant"`: on `[t_k, t_{k+1})` the value is block `k`, and
      at `t_L` it is block `L-1`. Euler's method on this grid evaluates exactly
      block `k` at `t_k`: this is what an Euler ResNet holds.
    - `interpolation="linear"`: block `k`'s value is placed at `t_k`
      (`k = 0..L-1`); on `[t_k, t_{k+1}]` with `k <= L-2` the value is
      `p_k + w (p_{k+1} - p_k)`, `w = (t - t_k) / (t_{k+1} - t_k)`, and on the
      last interval `[t_{L-1}, t_L]` it stays `p_{L-1}`. The result is
      continuous in `t` and equals block `k` exactly at `t_k`.

    A `t` outside `[t_0, t_L]` is clamped to the interval (the value at the
    nearer end); this is silent, also under `jax.jit`.

    **Arguments:**

    - `params`: the stack of `L >= 1` parameter sets.
    - `ts`: the grid, shape `(L+1,)`, strictly increasing (checked when concrete).
      Default: uniform on `[0, 1]`.
    - `interpolation`: `"constant"` or `"linear"`.
    """

    params: PyTree[Array]
    ts: Real[Array, " num_times"]
    interpolation: Interpolation = eqx.field(static=True)

    def __init__(
        self,
        params: PyTree[Array],
        ts: Real[ArrayLike, " num_times"] | None = None,
        interpolation: Interpolation = "constant",
    ):
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"GridParams: interpolation={interpolation!r} is not supported; "
                f"use one of {_INTERPOLATIONS}"
            )
        num_blocks = leading_axis_size(params, "GridParams: params")
        if num_blocks < 1:
            raise ValueError("GridParams: params must hold at least one block")
        if ts is None:
            ts = uniform_grid(num_blocks, dtype=_float_dtype(params))
        ts = jnp.asarray(ts)
        check_time_grid(ts, "GridParams: ts", num_steps=num_blocks)
        self.params = params
        self.ts = ts
        self.interpolation = interpolation

    @property
    def num_blocks(self) -> int:
        """`L`, the number of parameter sets."""
        return self.ts.shape[-1] - 1

    def __call__(self, t: Real[ArrayLike, ""]) -> PyTree[Array]:
        """The parameters at time `t` (a PyTree like one block of `params`)."""
        L = self.num_blocks
        ts = jax.lax.stop_gradient(self.ts)  # the grid is fixed, not trained
        t = jnp.clip(jnp.asarray(t), ts[0], ts[-1])
        k = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, L - 1)
        here = _take(self.params, k)
        if self.interpolation == "constant":
            return here
        k_next = jnp.minimum(k + 1, L - 1)
        t_next = ts[jnp.minimum(k + 1, L)]
        w = jnp.clip((t - ts[k]) / (t_next - ts[k]), 0, 1)
        w = jnp.where(k < L - 1, w, 0)
        return jtu.tree_map(
            lambda a, b: a + w.astype(a.dtype) * (b - a),
            here,
            _take(self.params, k_next),
        )


def evaluate_params(params: Any, t: Real[ArrayLike, ""]) -> Any:
    """`params(t)` if `params` is callable (time-dependent), else `params`."""
    return params(t) if callable(params) else params


class TwoLayerField(eqx.Module):
    """The two-layer velocity field `v(y, t) = W2(t) sigma(W1(t) y + b1(t)) + b2(t)`.

    (eq. 2). A diffrax vector field: `TwoLayerField(sigma)(t, y, args)` where
    `args` is a [`TwoLayerParams`][] (fixed in time; one ResNet block) or any
    callable `t -> TwoLayerParams` ([`GridParams`][], an Equinox module, or a
    plain function). It drops into `diffrax.ODETerm` unchanged:

    ```python
    field = TwoLayerField(jnp.tanh)
    term = diffrax.ODETerm(field)
    diffrax.diffeqsolve(term, solver, t0, t1, dt0, y0, args=GridParams(stack, ts))
    ```

    **Arguments:**

    - `sigma`: an elementwise activation (a static field: it is not trained).
    """

    sigma: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(
        self,
        t: Real[ArrayLike, ""],
        y: Float[Array, " n"],
        args: "TwoLayerParams | Callable[[Any], TwoLayerParams]",
    ) -> Float[Array, " n"]:
        params = evaluate_params(args, t)
        if not isinstance(params, TwoLayerParams):
            raise TypeError(
                "TwoLayerField: args must be a TwoLayerParams or a callable "
                f"t -> TwoLayerParams, got {type(params).__name__}"
            )
        return two_layer_velocity(params, y, self.sigma)


# Helpers shared with the ResNet module.


def uniform_grid(
    num_steps: int,
    t0: Real[ArrayLike, ""] = 0.0,
    t1: Real[ArrayLike, ""] = 1.0,
    *,
    dtype: Any = None,
) -> Real[Array, " num_times"]:
    """The uniform grid `t_k = t0 + k (t1 - t0) / K`, `k = 0..K`, shape `(K+1,)`."""
    _check_positive_int("uniform_grid: num_steps", num_steps)
    return jnp.linspace(t0, t1, num_steps + 1, dtype=dtype)


def check_time_grid(ts: Array, what: str, num_steps: int | None = None) -> None:
    """Raise if `ts` is not 1-D, of length `num_steps + 1`, strictly increasing.

    The monotonicity check runs only when `ts` is concrete (not traced).
    """
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"{what} must be 1-D with at least 2 points, got {ts.shape}")
    if num_steps is not None and ts.shape[0] != num_steps + 1:
        raise ValueError(
            f"{what} has {ts.shape[0]} points, expected {num_steps + 1} "
            f"(one more than the {num_steps} blocks)"
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        raise TypeError(f"{what} must be floating point, got dtype {ts.dtype}")
    if not isinstance(ts, Tracer):
        steps = np.diff(np.asarray(ts))
        if not np.all(steps > 0):
            raise ValueError(
                f"{what} must be strictly increasing; step {int(np.argmin(steps))} "
                f"is {steps.min()}"
            )


def leading_axis_size(tree: PyTree, what: str) -> int:
    """The common leading-axis size of the array leaves of `tree`."""
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) > 0 else -1 for x in _arrays(tree)}
    if not sizes:
        raise ValueError(f"{what} has no array leaves to stack blocks along")
    if -1 in sizes or len(sizes) != 1:
        shapes = [jnp.shape(x) for x in _arrays(tree)]
        raise ValueError(
            f"{what}: every array must have the same leading (block) axis, got "
            f"shapes {shapes}"
        )
    return sizes.pop()


def _arrays(tree: PyTree) -> list[Array]:
    return [x for x in jtu.tree_leaves(tree) if eqx.is_array(x)]


def _take(stack: PyTree, k: Array) -> PyTree:
    return jtu.tree_map(lambda a: a[k] if eqx.is_array(a) else a, stack)


def _float_dtype(tree: PyTree) -> Any:
    dtypes = [x.dtype for x in _arrays(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")


def _check_two_layer_shapes(W1: Array, b1: Array, W2: Array, b2: Array) -> None:
    shapes = [jnp.shape(a) for a in (W1, b1, W2, b2)]
    if len(shapes[0]) < 2:
        raise ValueError(f"TwoLayerParams: W1 must be (..., m, n), got {shapes[0]}")
    *lead, m, n = shapes[0]
    expected = [(*lead, m, n), (*lead, m), (*lead, n, m), (*lead, n)]
    if shapes != expected:
        raise ValueError(
            "TwoLayerParams: shapes of (W1, b1, W2, b2) must be "
            f"(..., m, n), (..., m), (..., n, m), (..., n); got {shapes}"
        )
