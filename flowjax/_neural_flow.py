"""The continuous counterpart of an Euler ResNet: an adaptive diffrax solve (eq. 3).

[`NeuralFlow`][] integrates `y' = f(t, y, params(t))` with diffrax;
[`resnet_to_flow`][] turns a ResNet's blocks into samples of a field in time and
[`flow_to_resnet`][] samples a field at the points of any grid, so a ResNet can be
refined (`N -> 2N` blocks) or coarsened through its flow.
"""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree, Real

from ._resnet import EulerResNet
from ._two_layer import (
    GridParams,
    Interpolation,
    check_time_grid,
    evaluate_params,
    uniform_grid,
)


class NeuralFlow(eqx.Module):
    """The flow `y' = f(t, y, params(t))` on `[t0, t1]`, solved adaptively by diffrax.

    The continuous model of which an [`EulerResNet`][] is the Euler
    discretization (eq. 3, 10-11).

    **Arguments:**

    - `field`: `f(t, y, args)`, as for [`EulerResNet`][].
    - `params`: a callable `t -> args` (e.g. [`GridParams`][]) for parameters
      varying in time, or fixed `args` (anything not callable).
    - `t0`, `t1`: the time interval.
    - `solver`: a diffrax solver (default `diffrax.Tsit5()`).
    - `stepsize_controller`: default `diffrax.PIDController(rtol=1e-6,
      atol=1e-8)`.
    - `adjoint`: default `diffrax.RecursiveCheckpointAdjoint()`.
    - `dt0`: initial step (`None`: chosen by the controller).
    - `max_steps`: step budget; reaching it raises an error (see `solve`).

    `flow(y0) -> y(t1)`; `flow.solve(y0)` returns the `diffrax.Solution` with
    solver statistics (`sol.stats["num_steps"]`).
    """

    field: Callable[..., PyTree[Array]]
    params: Any
    t0: float | Real[Array, ""]
    t1: float | Real[Array, ""]
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    dt0: float | Real[Array, ""] | None
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., PyTree[Array]],
        params: Any,
        t0: float | Real[Array, ""] = 0.0,
        t1: float | Real[Array, ""] = 1.0,
        *,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: diffrax.AbstractAdjoint | None = None,
        dt0: float | Real[Array, ""] | None = None,
        max_steps: int = 4096,
    ):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int):
            raise TypeError(f"NeuralFlow: max_steps must be an int, got {max_steps!r}")
        if max_steps < 1:
            raise ValueError(f"NeuralFlow: max_steps must be >= 1, got {max_steps}")
        self.field = field
        self.params = params
        self.t0 = t0
        self.t1 = t1
        self.solver = diffrax.Tsit5() if solver is None else solver
        if stepsize_controller is None:
            stepsize_controller = diffrax.PIDController(rtol=1e-6, atol=1e-8)
        self.stepsize_controller = stepsize_controller
        self.adjoint = (
            diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
        )
        self.dt0 = dt0
        self.max_steps = max_steps

    def vector_field(self, t: Real[ArrayLike, ""], y: PyTree[Array]) -> PyTree[Array]:
        """The velocity `f(t, y, params(t))`."""
        return self.field(t, y, evaluate_params(self.params, t))

    def __call__(self, y0: PyTree[Array]) -> PyTree[Array]:
        """The state at `t1` (the flow map from `t0` to `t1` applied to `y0`)."""
        ys = self.solve(y0).ys
        return jtu.tree_map(lambda a: a[-1], ys)

    def solve(
        self, y0: PyTree[Array], saveat: diffrax.SaveAt | None = None
    ) -> diffrax.Solution:
        """Run `diffrax.diffeqsolve`; `saveat` defaults to `t1` only.

        **Raises:** an `EquinoxRuntimeError` (also under `jit`) if the solver
        reaches `max_steps` or fails otherwise; the message says what to try.
        """
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_ParamsInTime(self.field)),
            self.solver,
            self.t0,
            self.t1,
            self.dt0,
            y0,
            args=self.params,
            saveat=diffrax.SaveAt(t1=True) if saveat is None else saveat,
            stepsize_controller=self.stepsize_controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=False,
        )
        return eqx.tree_at(lambda s: s.ys, sol, self._check(sol))

    def _check(self, sol: diffrax.Solution) -> PyTree[Array]:
        ys = eqx.error_if(
            sol.ys,
            sol.result == diffrax.RESULTS.max_steps_reached,
            f"NeuralFlow: the adaptive solve reached max_steps={self.max_steps} "
            "before t1. Try a larger max_steps, or looser rtol/atol in the "
            "stepsize controller (the field may be stiff or very fast).",
        )
        return eqx.error_if(
            ys,
            sol.result != diffrax.RESULTS.successful,
            "NeuralFlow: the adaptive solve failed (step size too small, or the "
            "field returned NaN/inf). Check the field and the initial value; try "
            "looser rtol/atol or another solver.",
        )


class _ParamsInTime(eqx.Module):
    """`(t, y, params) -> field(t, y, params(t))`, a vector field for ODETerm."""

    field: Callable[..., PyTree[Array]]

    def __call__(self, t, y, params):
        return self.field(t, y, evaluate_params(params, t))


# Conversions


def resnet_to_flow(
    resnet: EulerResNet,
    interpolation: Interpolation = "constant",
    *,
    rtol: float | None = None,
    atol: float | None = None,
    **flow_kwargs: Any,
) -> NeuralFlow:
    """The flow whose Euler discretization on `resnet.ts` is `resnet`.

    Block `k`'s parameters become the field's parameters at `t_k`
    ([`GridParams`][] on the ResNet's grid): `"constant"` holds them on
    `[t_k, t_{k+1})`, so Euler's method on the flow with the same steps
    reproduces the ResNet bit for bit; `"linear"` interpolates between them
    (continuous in `t`, and the same ResNet at the grid points).

    Unless `stepsize_controller` is given in `flow_kwargs`, the flow uses
    `PIDController(rtol, atol)` (default `1e-6`, `1e-8`) wrapped in a
    `diffrax.ClipStepSizeController` that steps across the grid points (jumps of
    the parameters for `"constant"`, kinks for `"linear"`). Other `flow_kwargs`
    go to [`NeuralFlow`][].
    """
    if resnet.params is None:
        raise ValueError(
            "resnet_to_flow: the ResNet has no per-block parameters (params=None); "
            "its field is already a flow: NeuralFlow(resnet.field, None, t0, t1)"
        )
    grid = GridParams(resnet.params, resnet.ts, interpolation)
    if "stepsize_controller" in flow_kwargs:
        if rtol is not None or atol is not None:
            raise ValueError(
                "resnet_to_flow: give either stepsize_controller or rtol/atol, not both"
            )
    else:
        flow_kwargs["stepsize_controller"] = _grid_controller(
            resnet.ts, interpolation, 1e-6 if rtol is None else rtol, atol
        )
    return NeuralFlow(resnet.field, grid, resnet.ts[0], resnet.ts[-1], **flow_kwargs)


def _grid_controller(
    ts: Array, interpolation: Interpolation, rtol: float, atol: float | None
) -> diffrax.AbstractStepSizeController:
    pid = diffrax.PIDController(rtol=rtol, atol=1e-8 if atol is None else atol)
    inner = ts[1:-1]
    if inner.shape[0] == 0:
        return pid
    if interpolation == "constant":
        return diffrax.ClipStepSizeController(pid, jump_ts=inner)
    return diffrax.ClipStepSizeController(pid, step_ts=inner)


def flow_to_resnet(
    flow: NeuralFlow,
    num_steps: int | None = None,
    ts: Real[ArrayLike, " num_times"] | None = None,
    *,
    checkpoint: bool = False,
) -> EulerResNet:
    """The Euler ResNet of `flow` with `num_steps` blocks (eq. 10-13).

    Block `k` holds the field's parameters sampled at `t_k`; the grid is `ts`
    if given, else uniform on `[flow.t0, flow.t1]`. With `num_steps = 2 N` on a
    flow made from an `N`-block ResNet this refines it; with fewer, it coarsens.
    """
    if ts is None:
        if num_steps is None:
            raise ValueError("flow_to_resnet: give num_steps or ts")
        ts = uniform_grid(num_steps, flow.t0, flow.t1, dtype=_grid_dtype(flow))
    else:
        ts = jnp.asarray(ts)
        check_time_grid(ts, "flow_to_resnet: ts", num_steps=num_steps)
    return EulerResNet(
        flow.field, _sample_params(flow.params, ts[:-1]), ts, checkpoint=checkpoint
    )


def _sample_params(params: Any, ts: Array) -> PyTree[Array]:
    if callable(params):
        return jax.vmap(params)(ts)
    return jtu.tree_map(
        lambda a: jnp.broadcast_to(a, (ts.shape[0], *jnp.shape(a))), params
    )


def _grid_dtype(flow: NeuralFlow) -> Any:
    if isinstance(flow.params, GridParams):
        return flow.params.ts.dtype
    return None
