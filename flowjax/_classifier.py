"""Trainable flow models: embed, transport along a two-layer field, read out.

`FlowNet` is the prediction map `u(x, 0) = f(Phi_{0 -> T}(pad(x)))` of the transport
equation (eq. 1-6) with the two-layer field `v(y, t) = W2(t) sigma(W1(t) y + b1(t))
+ b2(t)` (eq. 2) whose parameters live on a time grid. The flow map is computed
either by Euler's method (a ResNet, eq. 10-17: discretize-then-optimize) or by an
adaptive diffrax solve (optimize-then-discretize).

`FlowCoordinateMLP` is a plain net whose layers are trained in flow coordinates,
`W = exp(P) exp(Lambda) exp(Q)` with `P`, `Q` skew (eq. 19-23).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from ._resnet import EulerResNet
from ._training import Task
from ._transport import Integrator
from ._two_layer import GridParams, Interpolation, TwoLayerField, TwoLayerParams


Method = Literal["discretize", "adaptive"]
_METHODS: tuple[str, ...] = get_args(Method)
_TASKS: tuple[str, ...] = get_args(Task)
_STATS = ("num_steps", "num_accepted_steps", "num_rejected_steps", "max_steps")


class _KineticField(eqx.Module):
    """The field on the augmented state `(y, e)`: `y' = v(y, t)`, `e' = |v(y, t)|^2`.

    Integrated from `e = 0`, `e(T)` is the kinetic energy of the trajectory,
    `int_0^T |v|^2 dt`; Euler's method gives `sum_k dt_k |v_k(y_k)|^2`.
    """

    field: Callable[..., Array]

    def __call__(self, t: Scalar, state: tuple[Array, Array], args: Any):
        y, _ = state
        v = self.field(t, y, args)
        return v, jnp.sum(jnp.square(v))


class FlowNet(eqx.Module):
    """A flow classifier or regressor: `x -> f(Phi_{0 -> T}(pad(x)))` (eq. 1-6).

    1. Embed: pad the input `x` of shape `(in_size,)` with zeros to `(n,)`
       (`n > in_size` gives the flow room that a flow in the input dimension
       lacks: flows are homeomorphisms).
    2. Transport along `v(y, t) = W2(t) sigma(W1(t) y + b1(t)) + b2(t)` (eq. 2) on
       `[t_0, t_L]`, the parameters a `GridParams` of `L` blocks: piecewise
       constant (Euler with one step a block is exactly a ResNet, eq. 14-17) or
       linearly interpolated in time.
    3. Read out: `W_out y + b_out` (linear readout), or the first `out_size`
       coordinates of `y` when `W_out is None` (the flow map itself).

    Build one with `FlowNet.init`. Classification outputs logits (softmax
    cross-entropy in `flowjax.fit`); regression outputs values (squared error).

    **Fields:**

    - `grid`: the `GridParams` of the velocity field (a stacked `TwoLayerParams`).
    - `W_out`: `(out_size, n)` or `None`; `b_out`: `(out_size,)` or `None`.
    - `in_size`, `out_size`: input and output dimension (static).
    - `sigma`: the activation of the field (static).
    - `task`: `'classification'` or `'regression'` (static).
    - `method`: `'discretize'` (Euler ResNet under `lax.scan`, backprop through
      it) or `'adaptive'` (diffrax solve with `integrator`, gradients by its
      adjoint; static).
    - `num_steps`: Euler steps on a uniform grid of `[t_0, t_L]`, or `None` for
      one step a block on the parameters' own grid (static).
    - `checkpoint`: rematerialise each Euler step in the backward pass (static).
    - `integrator`: the `flowjax.Integrator` of the adaptive path; its adjoint is
      `diffrax.RecursiveCheckpointAdjoint()` by default, pass
      `Integrator(adjoint=diffrax.BacksolveAdjoint())` to solve backwards instead.
      A `diffrax.PIDController` is made to step onto the grid's inner times,
      where the parameters jump (`'constant'`) or bend (`'linear'`).

    Switch paths with `net.replace(method="adaptive")` (and back), the
    parameters unchanged.
    """

    grid: GridParams
    W_out: Float[Array, "k n"] | None
    b_out: Float[Array, " k"] | None
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    sigma: Callable[[Array], Array] = eqx.field(static=True)
    task: Task = eqx.field(static=True, default="classification")
    method: Method = eqx.field(static=True, default="discretize")
    num_steps: int | None = eqx.field(static=True, default=None)
    checkpoint: bool = eqx.field(static=True, default=False)
    integrator: Integrator = Integrator()

    def __check_init__(self):
        _check_choice("task", self.task, _TASKS)
        _check_choice("method", self.method, _METHODS)
        if not isinstance(self.grid.params, TwoLayerParams):
            raise TypeError(
                f"FlowNet.grid must hold a stacked TwoLayerParams, got "
                f"{type(self.grid.params).__name__}."
            )
        n = self.n
        if not 1 <= self.in_size <= n:
            raise ValueError(
                f"FlowNet: in_size={self.in_size} must be between 1 and the state "
                f"dimension n={n} (inputs are padded with zeros to n)."
            )
        _check_readout(self.W_out, self.b_out, self.out_size, n)
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"FlowNet: num_steps must be >= 1, got {self.num_steps}.")

    @classmethod
    def init(
        cls,
        in_size: int,
        out_size: int,
        *,
        n: int,
        hidden: int,
        num_blocks: int,
        key: PRNGKeyArray,
        task: Task = "classification",
        sigma: Callable[[Array], Array] = jnp.tanh,
        T: float = 1.0,
        interpolation: Interpolation = "constant",
        readout: Literal["linear", "project"] = "linear",
        method: Method = "discretize",
        num_steps: int | None = None,
        checkpoint: bool = False,
        integrator: Integrator | None = None,
        scale: float = 0.1,
        dtype: Any = None,
    ) -> "FlowNet":
        """A randomly initialised `FlowNet`.

        **Arguments:**

        - `in_size`, `out_size`: input dimension, number of classes (or outputs).
        - `n`: state dimension (`>= in_size`); `hidden`: hidden width `m` of the
          two-layer field; `num_blocks`: `L`, parameter sets on the time grid.
        - `key`: a JAX PRNG key.
        - `T`: the final time; the grid is uniform on `[0, T]`.
        - `interpolation`: `'constant'` (a ResNet) or `'linear'` in time.
        - `readout`: `'linear'` (trained `W_out`, `b_out`) or `'project'` (the
          first `out_size` coordinates; needs `out_size <= n`).
        - `scale`: size of the outer weights `W2` (small: start near the identity
          map); see `TwoLayerParams.init`.
        - the other options are the fields of the same name.
        """
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        field_key, out_key = jr.split(key)
        stack = TwoLayerParams.init(
            n, hidden, key=field_key, num_blocks=num_blocks, dtype=dtype, scale=scale
        )
        ts = jnp.linspace(0.0, T, num_blocks + 1, dtype=dtype)
        grid = GridParams(stack, ts, interpolation)
        W_out, b_out = _init_readout(readout, out_size, n, out_key, dtype)
        return cls(
            grid,
            W_out,
            b_out,
            in_size,
            out_size,
            sigma,
            task,
            method,
            num_steps,
            checkpoint,
            Integrator() if integrator is None else integrator,
        )

    def replace(self, **changes: Any) -> "FlowNet":
        """A copy with fields changed, e.g. `net.replace(method="adaptive")`."""
        return dataclasses.replace(self, **changes)

    @property
    def n(self) -> int:
        """The state dimension."""
        return self.grid.params.state_dim

    @property
    def field(self) -> TwoLayerField:
        """The velocity field `(t, y, args) -> v` (eq. 2), `args` a parameter set."""
        return TwoLayerField(self.sigma)

    def embed(self, x: Float[Array, " d"]) -> Float[Array, " n"]:
        """Pad the input with zeros into `R^n`."""
        if x.shape != (self.in_size,):
            raise ValueError(
                f"FlowNet takes inputs of shape ({self.in_size},), got {x.shape}; "
                f"vmap over a batch."
            )
        return jnp.zeros(self.n, x.dtype).at[: self.in_size].set(x)

    def readout(self, y: Float[Array, " n"]) -> Float[Array, " k"]:
        """The output function's linear part: `W_out y + b_out`, or `y[:k]`."""
        if self.W_out is None or self.b_out is None:
            return y[: self.out_size]
        return self.W_out @ y + self.b_out

    def resnet(self) -> EulerResNet:
        """The Euler discretization of the transport as a ResNet (eq. 10-17).

        With `num_steps=None` its blocks are the grid's parameter sets; otherwise
        `num_steps` uniform steps sample the field's parameters at `t_k`.
        """
        grid = self._frozen_grid()
        if self.num_steps is None:
            params, ts = grid.params, grid.ts
        else:
            ts = jnp.linspace(grid.ts[0], grid.ts[-1], self.num_steps + 1)
            params = jax.vmap(grid)(ts[:-1])
        return EulerResNet(self.field, params, ts, checkpoint=self.checkpoint)

    def transport(self, y0: Float[Array, " n"]) -> Float[Array, " n"]:
        """The flow map `Phi_{t_0 -> t_L}(y0)` of the characteristics (eq. 3-4)."""
        return self._solve(self.field, y0)

    def transport_with_stats(
        self, y0: Float[Array, " n"]
    ) -> tuple[Float[Array, " n"], dict[str, Array]]:
        """The flow map `Phi_{t_0 -> t_L}(y0)` and the solver's statistics.

        On the adaptive path the statistics are diffrax's: `num_steps` (steps
        tried), `num_accepted_steps`, `num_rejected_steps` and `max_steps`. The
        number of function evaluations follows from the solver: for `diffrax.Tsit5`
        (first-same-as-last) with a `'linear'` grid it is `6 num_steps + 1` (on a
        `'constant'` grid more: the first stage is recomputed after each jump of
        the parameters). On the Euler path every step is accepted and evaluates
        the field once: `num_steps` is the number of Euler steps. Each value is an
        integer scalar (one an input under `vmap`).
        """
        if self.method == "discretize":
            resnet = self.resnet()
            steps = jnp.asarray(resnet.ts.shape[0] - 1, jnp.int32)
            stats = {
                "num_steps": steps,
                "num_accepted_steps": steps,
                "num_rejected_steps": jnp.zeros((), jnp.int32),
                "max_steps": steps,
            }
            return resnet(y0), stats
        grid = self._frozen_grid()
        integrator = _with_grid_times(self.integrator, grid)
        solution = integrator.solve(self.field, y0, grid.ts[0], grid.ts[-1], grid)
        assert solution.ys is not None
        stats = {name: jnp.asarray(solution.stats[name]) for name in _STATS}
        return solution.ys[-1], stats

    def solver_stats(self, x: Float[Array, " d"]) -> dict[str, Array]:
        """The statistics of the transport of the input `x` (`in_size`,): see
        `transport_with_stats`."""
        return self.transport_with_stats(self.embed(x))[1]

    def forward_with_energy(self, x: Float[Array, " d"]) -> tuple[Array, Array]:
        """The output and the kinetic energy `int |v|^2 dt` of `x`'s trajectory.

        On the Euler path the energy is `sum_k dt_k |v_k(y_k)|^2`; on the adaptive
        path the integral is solved along with the state.
        """
        state = (self.embed(x), jnp.zeros((), x.dtype))
        y, energy = self._solve(_KineticField(self.field), state)
        return self.readout(y), energy

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " k"]:
        """The prediction `u(x, 0) = f(Phi_{0 -> T}(pad(x)))` (logits or values)."""
        return self.readout(self.transport(self.embed(x)))

    def time_smoothness(self) -> Scalar:
        """`sum_l |theta_{l+1} - theta_l|^2` over adjacent blocks' parameters.

        Small for a field that is smooth in time (adjacent blocks differ by
        `O(dt)`, sec. 2).
        """
        leaves = jax.tree.leaves(self.grid.params)
        return sum(jnp.sum(jnp.square(p[1:] - p[:-1])) for p in leaves)  # type: ignore

    def trainable_spec(self) -> "FlowNet":
        """`True` at the trained arrays (field parameters and readout), else `False`.

        The time grid is not trained; `flowjax.fit` reads this filter.
        """
        spec = jax.tree.map(lambda _: False, self)
        return eqx.tree_at(
            lambda m: (m.grid.params, m.W_out, m.b_out),
            spec,
            (
                jax.tree.map(eqx.is_inexact_array, self.grid.params),
                self.W_out is not None,
                self.b_out is not None,
            ),
            is_leaf=lambda x: x is None,
        )

    def _frozen_grid(self) -> GridParams:
        """The grid with its times cut off from differentiation (times are fixed)."""
        ts = jax.lax.stop_gradient(self.grid.ts)
        return eqx.tree_at(lambda g: g.ts, self.grid, ts)

    def _solve(self, field: Callable, state: PyTree[Array]) -> PyTree[Array]:
        """The state at `t_L` of `state' = field(t, state, theta(t))`."""
        if self.method == "discretize":
            resnet = self.resnet()
            return EulerResNet(
                field, resnet.params, resnet.ts, checkpoint=self.checkpoint
            )(state)
        grid = self._frozen_grid()
        integrator = _with_grid_times(self.integrator, grid)
        solution = integrator.solve(field, state, grid.ts[0], grid.ts[-1], grid)
        return jax.tree.map(lambda y: y[-1], solution.ys)


def _with_grid_times(integrator: Integrator, grid: GridParams) -> Integrator:
    """Make an adaptive controller step onto the grid's inner times.

    The parameters jump there (`'constant'`) or have kinks (`'linear'`); a
    `PIDController` that steps across them loses its order.
    """
    controller = integrator.stepsize_controller
    inner = grid.ts[1:-1]
    if not isinstance(controller, diffrax.PIDController) or inner.shape[0] == 0:
        return integrator
    if grid.interpolation == "constant":
        clipped = diffrax.ClipStepSizeController(controller, jump_ts=inner)
    else:
        clipped = diffrax.ClipStepSizeController(controller, step_ts=inner)
    return eqx.tree_at(lambda i: i.stepsize_controller, integrator, clipped)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"FlowNet: {name} must be one of {allowed}, got {value!r}.")


def _check_readout(W_out, b_out, out_size: int, n: int) -> None:
    if (W_out is None) != (b_out is None):
        raise ValueError("FlowNet: give both W_out and b_out, or neither.")
    if W_out is None:
        if not 1 <= out_size <= n:
            raise ValueError(
                f"FlowNet: a projection readout needs 1 <= out_size <= n, got "
                f"out_size={out_size}, n={n}."
            )
        return
    assert b_out is not None
    if W_out.shape != (out_size, n) or b_out.shape != (out_size,):
        raise ValueError(
            f"FlowNet: the readout must have W_out of shape ({out_size}, {n}) and "
            f"b_out of shape ({out_size},), got {W_out.shape} and {b_out.shape}."
        )


def _init_readout(readout: str, out_size: int, n: int, key: PRNGKeyArray, dtype):
    if readout == "project":
        return None, None
    if readout != "linear":
        raise ValueError(
            f"FlowNet.init: readout must be 'linear' or 'project', got {readout!r}."
        )
    W_out = jr.normal(key, (out_size, n), dtype) / math.sqrt(n)
    return W_out, jnp.zeros(out_size, dtype)


# A plain net in flow coordinates


def _skew(A: Float[Array, "*L n n"]) -> Float[Array, "*L n n"]:
    return A - jnp.swapaxes(A, -1, -2)


class FlowCoordinateMLP(eqx.Module):
    """A plain net of `L` layers of width `n`, trained in flow coordinates.

    Layer `l` is `y -> sigma_l(U_l exp(Lambda_l) V_l y + b_l)` (eq. 23) with
    `U_l = exp(P_l)`, `V_l = exp(Q_l)` (eq. 20), `P_l = A_l - A_l^T` and
    `Q_l = B_l - B_l^T` skew by construction, `Lambda_l = diag(lam_l)` (eq. 21):
    the rotations are orthogonal with determinant 1 whatever the optimizer does,
    and every stretch is positive. Inputs are padded with zeros to `n`, the last
    layer has no activation, and the output is its first `out_size` entries.

    **Fields:** `A`, `B`: `(L, n, n)`; `lam`, `b`: `(L, n)`; `in_size`,
    `out_size`, `sigma`, `task` (static).
    """

    A: Float[Array, "L n n"]
    lam: Float[Array, "L n"]
    B: Float[Array, "L n n"]
    b: Float[Array, "L n"]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    sigma: Callable[[Array], Array] = eqx.field(static=True)
    task: Task = eqx.field(static=True, default="classification")

    def __check_init__(self):
        L, n, _ = self.A.shape
        expected = ((L, n, n), (L, n), (L, n, n), (L, n))
        shapes = tuple(x.shape for x in (self.A, self.lam, self.B, self.b))
        if shapes != expected:
            raise ValueError(
                f"FlowCoordinateMLP: (A, lam, B, b) must have shapes {expected}, got "
                f"{shapes}."
            )
        if not (self.in_size <= n and self.out_size <= n):
            raise ValueError(
                f"FlowCoordinateMLP: in_size={self.in_size} and out_size="
                f"{self.out_size} must be at most the width n={n}."
            )

    @classmethod
    def init(
        cls,
        in_size: int,
        out_size: int,
        *,
        width: int,
        depth: int,
        key: PRNGKeyArray,
        sigma: Callable[[Array], Array] = jnp.tanh,
        task: Task = "classification",
        dtype: Any = None,
    ) -> "FlowCoordinateMLP":
        """Random orthogonal layers: `U`, `V` random rotations, `Lambda = 0`, `b = 0`.

        `depth` is the number of layers `L`, `width` the width `n` of each.
        """
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        ka, kb = jr.split(key)
        shape = (depth, width, width)
        A = jr.normal(ka, shape, dtype) / math.sqrt(2 * width)
        B = jr.normal(kb, shape, dtype) / math.sqrt(2 * width)
        zeros = jnp.zeros((depth, width), dtype)
        return cls(A, zeros, B, zeros, in_size, out_size, sigma, task)

    def rotations(self) -> tuple[Float[Array, "L n n"], Float[Array, "L n n"]]:
        """`(U, V)`, each `(L, n, n)`: `exp(P_l)` and `exp(Q_l)` (eq. 20)."""
        expm = jax.vmap(jsl.expm)
        return expm(_skew(self.A)), expm(_skew(self.B))

    def weights(self) -> Float[Array, "L n n"]:
        """The plain weights `W_l = U_l exp(Lambda_l) V_l` (eq. 22), `(L, n, n)`."""
        U, V = self.rotations()
        return U * jnp.exp(self.lam)[:, None, :] @ V

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " k"]:
        """The net's output on one input (eq. 18, 23)."""
        n = self.A.shape[-1]
        y = jnp.zeros(n, x.dtype).at[: self.in_size].set(x)
        W = self.weights()
        for layer in range(W.shape[0]):
            y = W[layer] @ y + self.b[layer]
            if layer < W.shape[0] - 1:
                y = self.sigma(y)
        return y[: self.out_size]
