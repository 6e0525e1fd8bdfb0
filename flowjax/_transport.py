"""Characteristics, flow maps and the solution of the transport equation (eq. 1-6)."""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, PyTree

from ._activations import sigma_s, sigma_s_inverse
from ._fields import activation_field


VectorField = Callable[..., Any]

ACTIVATION_CUT = 1e-3
"""`flow_map` integrates `activation_field` up to `tau = 1 - ACTIVATION_CUT`."""


class Integrator(eqx.Module):
    """How characteristics are integrated: a diffrax solver and its settings.

    The defaults are an adaptive Runge-Kutta method (`diffrax.Tsit5`) with a PID
    step-size controller. Every field may be replaced by any diffrax counterpart.

    **Fields:**

    - `solver`: a `diffrax.AbstractSolver`.
    - `stepsize_controller`: a `diffrax.AbstractStepSizeController`; with
      `diffrax.ConstantStepSize` also give `dt0`.
    - `adjoint`: how gradients are computed (`diffrax.RecursiveCheckpointAdjoint`
      by default, or `diffrax.BacksolveAdjoint`, ...).
    - `max_steps`: the most steps one solve may take (static).
    - `dt0`: the first step, or `None` to let the controller choose (static).
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-6, atol=1e-8
    )
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint()
    max_steps: int = eqx.field(static=True, default=4096)
    dt0: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.max_steps < 1:
            raise ValueError(
                f"max_steps must be a positive integer, got {self.max_steps}."
            )

    def solve(
        self,
        vector_field: VectorField,
        y0: Array,
        t0: float | Array,
        t1: float | Array,
        args: PyTree = None,
        saveat: diffrax.SaveAt | None = None,
    ) -> diffrax.Solution:
        """Solve `y' = vector_field(t, y, args)` from `y(t0) = y0` to `t1` (eq. 3).

        Raises a clear error (at run time, also under `jit`) when the solver stops
        early, for example on reaching `max_steps`.
        """
        saveat = diffrax.SaveAt(t1=True) if saveat is None else saveat
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            self.solver,
            t0,
            t1,
            self.dt0,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=self.stepsize_controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=False,
        )
        return _error_if_failed(solution, self.max_steps)


def _error_if_failed(solution: diffrax.Solution, max_steps: int) -> diffrax.Solution:
    hit_max = solution.result == diffrax.RESULTS.max_steps_reached
    failed = solution.result != diffrax.RESULTS.successful
    ys = eqx.error_if(
        solution.ys,
        hit_max,
        f"the adaptive solve reached max_steps={max_steps} before its end time; "
        "raise max_steps, loosen rtol/atol, or pick another solver.",
    )
    ys = eqx.error_if(
        ys,
        failed,
        "the adaptive solve failed before its end time (step size collapsed or the "
        "state became non-finite); check the field for NaN or a singularity, "
        "tighten dtmin or try another solver.",
    )
    return eqx.tree_at(lambda s: s.ys, solution, ys)


def characteristics(
    vector_field: VectorField,
    x0: Array,
    t0: float | Array,
    t1: float | Array,
    args: PyTree = None,
    *,
    saveat: diffrax.SaveAt | None = None,
    integrator: Integrator | None = None,
) -> diffrax.Solution:
    """Solve the characteristic equation `x'(t) = v(x(t), t)`, `x(t0) = x0` (eq. 3).

    **Arguments:**

    - `vector_field`: `v` with diffrax's signature `(t, x, args) -> dx/dt`.
    - `x0`: the start point (any shape the field accepts).
    - `t0`, `t1`: start and end time; `t1 < t0` integrates backwards in time.
    - `args`: passed to the field.
    - `saveat`: a `diffrax.SaveAt` (by default the end point only).
    - `integrator`: a `flowjax.Integrator` (default: adaptive Tsit5 with a PID
      controller).

    **Returns:** the `diffrax.Solution`.

    **Raises:** an `eqx.error_if` error (also under `jit`) when `x0` has a NaN or
    infinite entry, and when the solve fails (see `Integrator.solve`).
    """
    integrator = Integrator() if integrator is None else integrator
    x0 = _finite_or_error(x0, "characteristics")
    return integrator.solve(vector_field, x0, t0, t1, args, saveat)


def _finite_or_error(x: PyTree, where: str) -> PyTree:
    """`x`, with an `eqx.error_if` check (also under `jit`) that it is finite.

    Without it a NaN start point surfaces as a solver failure ("max_steps").
    """
    finite = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)])
    )
    return eqx.error_if(
        x,
        ~finite,
        f"{where}: the start point x contains NaN or inf; characteristics start "
        "from a finite point (check the data or the computation that produced it).",
    )


def flow_map(
    vector_field: VectorField,
    x: Array,
    t0: float | Array,
    t1: float | Array,
    args: PyTree = None,
    *,
    integrator: Integrator | None = None,
) -> Array:
    """The flow map `Phi_{t0 -> t1}(x)` of the characteristics (eq. 4).

    Forward in time when `t1 > t0`, backward when `t1 < t0`; the identity when they
    are equal. A start point with NaN or inf is refused (`eqx.error_if`, also under
    `jit`).

    `flowjax.activation_field` is singular at `s = 1` for the ReLU family (it grows
    like `tau'(s) / (1 - tau(s))`, eq. 43-47; with the `"linear"` time scaling a
    float32 solve reaches `max_steps`). For that field, forward in time with
    concrete times ending past `tau = 1 - ACTIVATION_CUT` (`1e-3`), the solve stops
    there and the stage is closed exactly, `z -> sigma_{tau(t1)}(sigma_{tau}^{-1}
    (z))`, since each point moves on a straight line (eq. 42), as `flow_model`
    does. Backward or with traced times it is solved as it stands.
    """
    x = _finite_or_error(x, "flow_map")
    if _concrete_equal(t0, t1):
        return x
    if vector_field is activation_field and _concrete_less(t0, t1):
        return _activation_flow_map(x, t0, t1, args, integrator)
    solution = characteristics(vector_field, x, t0, t1, args, integrator=integrator)
    assert solution.ys is not None
    return jax.tree.map(lambda y: y[-1], solution.ys)


def _activation_flow_map(
    z: Array, t0: float | Array, t1: float | Array, args: Any, integrator
) -> Array:
    """The forward flow of `activation_field`: solved up to the cut, closed exactly.

    The solve runs from `min(t0, s_cut)` to `min(t1, s_cut)`, where
    `1 - tau(s_cut) = ACTIVATION_CUT`; from the time `s` the state has reached,
    `z -> sigma_{tau(t1)}(sigma_{tau(s)}^{-1}(z))` carries it to `t1` (eq. 40-42).
    """
    sigma, scaling = args
    s_cut = scaling.one_minus_tau_inverse(ACTIVATION_CUT)
    if float(np.asarray(t1)) <= s_cut:
        solution = characteristics(
            activation_field, z, t0, t1, args, integrator=integrator
        )
        assert solution.ys is not None
        return solution.ys[-1]
    if float(np.asarray(t0)) < s_cut:
        solution = characteristics(
            activation_field, z, t0, s_cut, args, integrator=integrator
        )
        assert solution.ys is not None
        z, t0 = solution.ys[-1], s_cut
    z = jnp.asarray(z)
    tau0 = scaling.tau(jnp.asarray(t0, z.dtype))
    tau1 = scaling.tau(jnp.asarray(t1, z.dtype))
    return sigma_s(sigma, sigma_s_inverse(sigma, z, tau0), tau1)


def solve_transport(
    terminal: Callable[[Array], Array],
    vector_field: VectorField,
    x: Array,
    t: float | Array,
    t1: float | Array,
    args: PyTree = None,
    *,
    integrator: Integrator | None = None,
) -> Array:
    """The transport solution `u(x, t) = f(Phi_{t -> t1}(x))` (eq. 1, 5).

    `u` solves `du/dt + v . grad u = 0` with terminal value `u(., t1) = f`; at
    `t = 0` it is the prediction of the network the field describes (eq. 6).

    **Arguments:**

    - `terminal`: the output function `f`, applied to one point.
    - `vector_field`, `args`: the transport velocity `v(t, x, args)`.
    - `x`: where to evaluate `u`; finite (NaN or inf is refused, see `flow_map`).
    - `t`: the time at which to evaluate, `t <= t1`.
    - `t1`: the terminal time.
    """
    if _concrete_less(t1, t):
        raise ValueError(
            f"solve_transport needs t <= t1 (the value is given at the terminal time "
            f"t1 and carried backwards); got t={t} and t1={t1}."
        )
    return terminal(flow_map(vector_field, x, t, t1, args, integrator=integrator))


def _concrete(x: ArrayLike) -> float | None:
    """`x` as a Python float when it is known while tracing, else `None`.

    Host-side (NumPy), so that inside `jit` a constant time stays a constant.
    """
    if any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(x)):
        return None
    return float(np.asarray(x))


def _concrete_equal(a: ArrayLike, b: ArrayLike) -> bool:
    a_value, b_value = _concrete(a), _concrete(b)
    return a_value is not None and a_value == b_value


def _concrete_less(a: ArrayLike, b: ArrayLike) -> bool:
    a_value, b_value = _concrete(a), _concrete(b)
    return a_value is not None and b_value is not None and a_value < b_value
