"""The continuous flow model of a plain net, integrated adaptively (eq. 48-50)."""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Scalar

from ._activations import sigma_s, sigma_s_inverse
from ._fields import (
    NUM_STAGES,
    affine_stage_field,
    linear_stage_generators,
    network_field,
    stage_field,
)
from ._flow_params import DEFAULT_KAPPA, LayerFlow, NetworkFlow, flow_parameters
from ._time_scaling import TimeScaling, time_scaling as get_time_scaling
from ._transport import Integrator


DEFAULT_ACTIVATION_CUT = 1e-3


class FlowModel(eqx.Module):
    """A plain net as a flow: characteristics of a glued velocity field (eq. 48-50).

    Layer `l` occupies `[l, l + 1]` of network time (so the end time `T` is the number
    of layers) and its five stages each a fifth of that. Calling the model on one
    input embeds it, integrates the characteristics adaptively stage by stage and
    reads the output off, reproducing the plain net (up to `exp(-kappa)` on null
    directions and the solver's tolerance).

    The activation stage is integrated up to `tau = 1 - activation_cut` and closed
    exactly from there with the homotopy's inverse (eq. 40-42): the ReLU field is
    singular at the stage's end, where off-the-shelf adaptive solves stall.
    """

    flow: NetworkFlow
    time_scaling: TimeScaling
    integrator: Integrator
    activation_cut: float = eqx.field(static=True, default=DEFAULT_ACTIVATION_CUT)

    def __check_init__(self):
        if not 0.0 < self.activation_cut < 1.0:
            raise ValueError(
                f"activation_cut must lie in (0, 1), got {self.activation_cut}."
            )

    @property
    def T(self) -> float:
        """The end time of the flow: one unit per layer."""
        return float(self.flow.num_layers)

    @property
    def args(self) -> tuple[NetworkFlow, TimeScaling, float]:
        """The `args` that go with `vector_field`."""
        return (self.flow, self.time_scaling, self.T)

    @staticmethod
    def vector_field(t: Scalar, y: Float[Array, " n"], args: Any) -> Float[Array, " n"]:
        """The glued network field `v(y, t)` on `[0, T]` (eq. 50); pass `model.args`."""
        return network_field(t, y, args)

    def embed(self, x: Array) -> Float[Array, " n"]:
        """Pad an input into `R^n` (eq. 19)."""
        return self.flow.embed(x)

    def readout(self, y: Float[Array, " n"]) -> Array:
        """Read the plain net's output off a state in `R^n`."""
        return self.flow.readout(y)

    def __call__(self, x: Array) -> Array:
        """The prediction `u(x, 0) = f(Phi_{0 -> T}(x))` for one input (eq. 6)."""
        return self.solve(x)[0]

    def solve(self, x: Array, t: ArrayLike = 0.0) -> tuple[Array, Int[Array, ""]]:
        """`u(x, t) = f(Phi_{t -> T}(x))` and the number of solver steps taken (eq. 5).

        `t` is a network time in `[0, T]`; `t = 0` gives the plain net's output. An
        input with NaN or inf is refused (`eqx.error_if`, also under `jit`).
        """
        t = _check_time(t, self.T)
        y, steps = self.flow_map(self.embed(_finite_or_error(x, "the input x")), t)
        return self.readout(y), steps

    def solve_batch(
        self, xs: Array, t: ArrayLike = 0.0
    ) -> tuple[Array, Int[Array, ""]]:
        """`u(x_i, t)` for inputs stacked on a leading axis, and the steps taken.

        Each stage is one adaptive solve of the whole `(B, n)` batch: the stage
        field is applied to every row, and the step-size controller's error norm
        runs over the batch, as a batched ODE solver such as torchdiffeq does.
        Faster than `jax.vmap(model.solve)` (one step sequence, no per-sample
        bookkeeping), at the price of sharing the steps: a sample is accepted
        when the batch's error norm is, so for per-sample error control vmap
        `solve`, or give the integrator a max norm (`diffrax.PIDController(...,
        norm=optimistix.max_norm)`).

        **Arguments:** `xs`: shape `(B, *input_shape)`; `t` as in `solve`.

        **Returns:** outputs of shape `(B, *output_shape)` and the total number of
        solver steps of the batch.
        """
        t = _check_time(t, self.T)
        xs = _finite_or_error(xs, "the inputs xs")
        flow = self.flow
        one = () if flow.in_size == "scalar" else (flow.d_in,)
        if xs.shape[1:] != one or xs.ndim == 0 or xs.shape[0] == 0:
            raise ValueError(
                f"solve_batch takes inputs of shape {one} stacked on a leading axis, "
                f"i.e. shape {(('B', *one))} with B >= 1; got shape {xs.shape}. "
                "For one input use `model.solve(x)`."
            )
        Y = jax.vmap(self.embed)(xs)
        Y, steps = _compiled_flow_map(self, Y, _time_or_error(t, self.T, Y.dtype), True)
        return jax.vmap(self.readout)(Y), steps

    def flow_map(
        self, y: Float[Array, " n"], t: ArrayLike = 0.0
    ) -> tuple[Float[Array, " n"], Int[Array, ""]]:
        """`Phi_{t -> T}(y)` for a state `y` in `R^n`, and the solver steps taken."""
        y = _finite_or_error(y, "the state y")
        t = _time_or_error(_check_time(t, self.T), self.T, y.dtype)
        return _compiled_flow_map(self, y, t, False)

    def _flow_map(
        self, y: Array, t: Array, batched: bool
    ) -> tuple[Array, Int[Array, ""]]:
        """`Phi_{t -> T}` of a state `(n,)`, or of a batch `(B, n)` solved jointly."""
        steps = jnp.zeros((), jnp.int32)
        for index, layer in enumerate(self.flow.layers):
            local = NUM_STAGES * (t - index)
            y, linear_steps = self._linear_part(
                layer, y, jnp.clip(local, 0.0, 4.0), batched
            )
            s0 = jnp.clip(local - (NUM_STAGES - 1), 0.0, 1.0)
            y, activation_steps = self._activation_stage(layer, y, s0, batched)
            steps = steps + linear_steps + activation_steps
        return y, steps

    def stage_states(self, x: Array) -> Float[Array, "stages n"]:
        """The state in `R^n` at every stage boundary: shape `(5 L + 1, n)`."""
        y = self.embed(_finite_or_error(x, "the input x"))
        states = [y]
        for layer in self.flow.layers:
            for stage in range(NUM_STAGES):
                y, _ = self._stage(layer, stage, y, jnp.zeros((), y.dtype))
                states.append(y)
        return jnp.stack(states)

    def trajectory(
        self, x: Array, points_per_stage: int = 16
    ) -> tuple[Float[Array, " times"], Float[Array, "times n"]]:
        """Network times and states along the characteristic from `x`, for plots.

        The activation stage is sampled on its exact straight-line trajectory.
        """
        y = self.embed(_finite_or_error(x, "the input x"))
        times, states = [jnp.zeros((1,), y.dtype)], [y[None]]
        for index, layer in enumerate(self.flow.layers):
            for stage in range(NUM_STAGES):
                s = jnp.linspace(0.0, 1.0, points_per_stage + 1, dtype=y.dtype)[1:]
                ys = self._stage_samples(layer, stage, y, s)
                times.append(index + (stage + s) / NUM_STAGES)
                states.append(ys)
                y = ys[-1]
        return jnp.concatenate(times), jnp.concatenate(states)

    def _stage(
        self, layer: LayerFlow, stage: int, y: Array, s0: Array
    ) -> tuple[Array, Int[Array, ""]]:
        if stage == NUM_STAGES - 1:
            return self._activation_stage(layer, y, s0)
        f, args = stage_field(stage, layer, self.time_scaling)
        sol = self.integrator.solve(f, y, s0, jnp.ones_like(s0), args)
        assert sol.ys is not None and sol.stats is not None
        return sol.ys[-1], sol.stats["num_steps"]

    def _linear_part(
        self, layer: LayerFlow, y: Array, s0: Array, batched: bool = False
    ) -> tuple[Array, Int[Array, ""]]:
        """The four linear stages from local time `s0` in `[0, 4]`, one solve each.

        One solve per stage keeps the adaptive steps from striding over a stage
        whose field is zero at its ends; `lax.scan` compiles the solve once.
        """
        G, c = linear_stage_generators(layer)
        starts = jnp.clip(s0 - jnp.arange(NUM_STAGES - 1, dtype=y.dtype), 0.0, 1.0)

        def stage(y, inputs):
            G_k, c_k, start = inputs
            args = (G_k, c_k, self.time_scaling)
            end = jnp.ones_like(start)
            f = _rowwise(affine_stage_field) if batched else affine_stage_field
            sol = self.integrator.solve(f, y, start, end, args)
            assert sol.ys is not None and sol.stats is not None
            return sol.ys[-1], sol.stats["num_steps"]

        y, steps = jax.lax.scan(stage, y, (G, c, starts))
        return y, jnp.sum(steps)

    def _activation_stage(
        self, layer: LayerFlow, z: Array, s0: Array, batched: bool = False
    ) -> tuple[Array, Int[Array, ""]]:
        if _is_identity(layer):
            return z, jnp.zeros((), jnp.int32)
        f, args = stage_field(NUM_STAGES - 1, layer, self.time_scaling)
        f = _rowwise(f) if batched else f
        s_cut = jnp.asarray(self._s_cut, z.dtype)
        s1 = jnp.maximum(s0, s_cut)
        sol = self.integrator.solve(f, z, jnp.minimum(s0, s_cut), s_cut, args)
        assert sol.ys is not None and sol.stats is not None

        # Close the stage exactly: each point moves on a straight line (eq. 42).
        z_cut = sol.ys[-1]
        tau1 = self.time_scaling.tau(jnp.where(s0 >= 1.0, s_cut, s1))
        y = sigma_s_inverse(layer.sigma, z_cut, tau1)
        z_end = jnp.where(s0 >= 1.0, z, layer.sigma(y))
        return z_end, sol.stats["num_steps"]

    def _stage_samples(self, layer: LayerFlow, stage: int, y: Array, s: Array) -> Array:
        if stage == NUM_STAGES - 1:
            return jax.vmap(lambda s_: sigma_s(layer.sigma, y, s_))(
                self.time_scaling.tau(s)
            )
        f, args = stage_field(stage, layer, self.time_scaling)
        saveat = diffrax.SaveAt(ts=s)
        sol = self.integrator.solve(f, y, jnp.zeros((), y.dtype), s[-1], args, saveat)
        assert sol.ys is not None
        return sol.ys

    @property
    def _s_cut(self) -> float:
        return self.time_scaling.one_minus_tau_inverse(self.activation_cut)


def flow_model(
    model: Any,
    *,
    kappa: float = DEFAULT_KAPPA,
    n: int | None = None,
    time_scaling: str | TimeScaling = "smooth",
    integrator: Integrator | None = None,
    activation_cut: float = DEFAULT_ACTIVATION_CUT,
) -> FlowModel:
    """The continuous flow model of a plain net (eq. 48-50).

    **Arguments:**

    - `model`: an `eqx.nn.MLP` (every option) or an `eqx.nn.Sequential` of
      `eqx.nn.Linear` layers and elementwise non-decreasing activations.
    - `kappa`: the stretch constant for zero singular values (eq. 21).
    - `n`: the ambient dimension (default: the smallest that works, eq. 19).
    - `time_scaling`: `"smooth"`, `"cubic"`, `"linear"` or a `TimeScaling` (sec. 3.1).
    - `integrator`: a `flowjax.Integrator` (solver, step-size controller, adjoint,
      `max_steps`); default adaptive Tsit5 with a PID controller.
    - `activation_cut`: the activation stage is integrated to `tau = 1 -
      activation_cut` and closed exactly from there.

    **Returns:** a `FlowModel`, called on one input like the plain net.
    """
    flow = flow_parameters(model, kappa=kappa, n=n)
    integrator = Integrator() if integrator is None else integrator
    return FlowModel(flow, get_time_scaling(time_scaling), integrator, activation_cut)


def _check_time(t: ArrayLike, T: float) -> ArrayLike:
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"t must be one network time (a scalar in [0, {T}]), got an array of shape "
            f"{jnp.shape(t)}; vmap over times to solve at several."
        )
    try:
        value = float(t)  # pyright: ignore[reportArgumentType]
    except (TypeError, jax.errors.ConcretizationTypeError):
        return t  # a traced time is checked by `_time_or_error`
    if not 0.0 <= value <= T:
        raise ValueError(
            f"time t={value} lies outside the model's interval [0, {T}] "
            f"(one unit of time per layer)."
        )
    return t


def _time_or_error(t: ArrayLike, T: float, dtype: Any) -> Array:
    """`t` as an array of `dtype`, with an `eqx.error_if` check (for a traced `t`,
    which `_check_time` cannot see) that it is finite and in `[0, T]`."""
    t = jnp.asarray(t, dtype)
    return eqx.error_if(
        t,
        ~(jnp.isfinite(t) & (t >= 0) & (t <= T)),
        f"FlowModel: the time t must be finite and lie in [0, {T}] (one unit of time "
        "per layer).",
    )


# One compiled program per model structure, shape and `batched`: called eagerly, the
# stage solves would otherwise be traced and compiled anew on every call.
_compiled_flow_map = eqx.filter_jit(
    lambda model, y, t, batched: model._flow_map(y, t, batched)
)


def _finite_or_error(x: Array, what: str) -> Array:
    """`x`, with an `eqx.error_if` check (also under `jit`) that it is finite.

    Without it a NaN input surfaces as a solver failure ("max_steps") far from its
    cause.
    """
    x = jnp.asarray(x)
    return eqx.error_if(
        x,
        ~jnp.all(jnp.isfinite(x)),
        f"FlowModel: {what} contains NaN or inf; the flow model maps finite "
        "inputs only (check the data or the computation that produced it).",
    )


def _rowwise(f: Callable[..., Array]) -> Callable[..., Array]:
    """A field `f(s, y, args)` on one state as a field on a batch `(B, n)`."""

    def field(s: Scalar, Y: Array, args: Any) -> Array:
        return jax.vmap(f, in_axes=(None, 0, None))(s, Y, args)

    return field


def _is_identity(layer: LayerFlow) -> bool:
    return layer.sigma.name == "identity"
