"""`flowjax.refine`: a plain net re-discretized as a residual network (sec. 4).

Each plain layer `sigma(W x + b)` is a flow of five stages (eq. 48-49). Refining
takes Euler steps on them, `num_steps` per stage, each stage in its own homotopy
parameter `s` (math.md sec. 6 item 1):

- `linear="whole"` keeps `x -> W x + b` as one non-residual map (eq. 51);
  `linear="flow"` replaces it by `K` linear blocks for the rotation by `V`, `K`
  diagonal blocks for the stretch, `K` linear blocks for the rotation by `U` and `K`
  translation blocks (eq. 52-53), all read from `flowjax.flow_parameters`;
- then `K` activation blocks (eq. 54-72): exact for the ReLU family and for the
  `"exact"` option, approximate for `"linearized"` and `"newton"`, exact on twice
  the width for `"augmented"` (see `flowjax._activation_blocks`).
"""

import numbers
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._activation_blocks import (
    LEAKY_RELU_UNROLL,
    ActivationStage,
    AugmentedStage,
    HomotopyGrid,
    LeakyReluBlock,
    augmented_blocks,
    homotopy_blocks,
    homotopy_grid,
    is_identity,
    leaky_slope,
    linearized_blocks,
    newton_blocks,
    relu_family_weights,
)
from ._activations import Activation
from ._flow_params import (
    DEFAULT_KAPPA,
    LayerFlow,
    _error_if_not_finite,
    flow_parameters,
)
from ._linalg import _check_kappa, embed_layer
from ._plain_net import PlainNet, plain_net
from ._resnet import (
    AbstractStage,
    Chain,
    LinearMap,
    LinearStage,
    StretchScheme,
    StretchStage,
    TranslationStage,
    parameter_count,
)
from ._time_scaling import TimeScaling, time_scaling as get_time_scaling


LinearOption = Literal["whole", "flow"]
ActivationOption = Literal["exact", "linearized", "newton", "augmented"]
_LINEAR: tuple[str, ...] = get_args(LinearOption)
_ACTIVATION: tuple[str, ...] = get_args(ActivationOption)
_STRETCH = ("implicit", "exact", "explicit")
DEFAULT_NEWTON_STEPS = 3


class RefinedNet(eqx.Module):
    """A residual network refined from a plain net, called like the plain net.

    It embeds one input (a `'scalar'` input becomes shape `(1,)`) by zero padding
    into the width of its first state, applies `chain` and reads the output off
    the first entries of the last state (shape `()` for a `'scalar'` output).

    **Fields:**

    - `chain`: the stages, a `flowjax._resnet.Chain`.
    - `in_size`, `out_size`: as in `eqx.nn.MLP` (static).
    - `width_in`: the width of the first state (static).
    - `n`: the ambient dimension of the flow, or `None` for `linear="whole"`
      without an `n`, where each state has its layer's own width (static).
    - `num_steps`, `linear`: the options it was refined with (static).
    """

    chain: Chain
    in_size: int | Literal["scalar"] = eqx.field(static=True)
    out_size: int | Literal["scalar"] = eqx.field(static=True)
    width_in: int = eqx.field(static=True)
    n: int | None = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
    linear: str = eqx.field(static=True)

    @property
    def depth(self) -> int:
        """The number of residual blocks."""
        return self.chain.depth

    def block_counts(self) -> dict[str, int]:
        """`{block kind: count}`; each non-residual `"LinearMap"` counts once."""
        return self.chain.block_counts()

    @property
    def num_params(self) -> int:
        """The number of stored numbers (all arrays, schedules included)."""
        return parameter_count(self)

    @property
    def num_non_residual(self) -> int:
        """The number of non-residual maps: one `LinearMap` per layer for
        `linear="whole"`, none for `linear="flow"`."""
        return sum(not stage.is_residual for stage in self.chain.stages)

    @property
    def is_residual(self) -> bool:
        """Whether every map is the identity plus an explicit residual."""
        return self.num_non_residual == 0

    def embed(self, x: Array) -> Float[Array, " width"]:
        """Zero-pad one input of the plain net into the first state."""
        d_in = 1 if self.in_size == "scalar" else self.in_size
        x = jnp.reshape(x, (1,)) if self.in_size == "scalar" else jnp.asarray(x)
        if x.shape != (d_in,):
            raise ValueError(
                f"the refined network takes inputs of shape {(d_in,)} "
                f"({self.in_size!r} in eqx.nn.MLP's terms), got shape {x.shape}."
            )
        dtype = jnp.result_type(
            x, *jax.tree.leaves(eqx.filter(self.chain, eqx.is_inexact_array))
        )
        x = x.astype(dtype)
        if self.width_in == d_in:
            return x
        return jnp.zeros(self.width_in, dtype).at[:d_in].set(x)

    def readout(self, y: Float[Array, " width"]) -> Array:
        """The plain net's output: the first entries of the last state."""
        d_out = 1 if self.out_size == "scalar" else self.out_size
        out = y[:d_out]
        return jnp.reshape(out, ()) if self.out_size == "scalar" else out

    def __call__(self, x: Array) -> Array:
        return self.readout(self.chain(self.embed(x)))


def refine(
    model: Any,
    num_steps: int,
    *,
    linear: LinearOption = "whole",
    activation: ActivationOption = "exact",
    newton_steps: int | None = None,
    reference_point: float = 0.0,
    time_scaling: str | TimeScaling = "linear",
    stretch: StretchScheme = "implicit",
    tied: bool = True,
    kappa: float = DEFAULT_KAPPA,
    n: int | None = None,
) -> RefinedNet:
    """Refine a plain net into a residual network with `num_steps` blocks per stage.

    **Arguments:**

    - `model`: what `flowjax.flow_model` accepts: an `eqx.nn.MLP` (every option) or
      an `eqx.nn.Sequential` of `eqx.nn.Linear` layers and elementwise
      non-decreasing activations.
    - `num_steps`: `K >= 1`, a Python int: Euler steps per stage.
    - `linear`: `"whole"` keeps `W x + b` as one non-residual map per layer
      (eq. 51); `"flow"` uses `K` blocks each for the rotation by `V`, the
      stretch, the rotation by `U` and the translation (eq. 52-53), first order
      in `1/K`.
    - `activation`: for smooth activations, how each block finds the preimage
      `sigma_s^{-1}(z)` (eq. 55): `"exact"` (safeguarded Newton to rounding: the
      stage equals `sigma` for every `K`), `"linearized"` (the paper's explicit
      two-layer blocks, eq. 69-72; their error does not vanish as `K` grows),
      `"newton"` (`newton_steps` explicit Newton steps from `z`; the error falls
      with `newton_steps`, not with `K`), or `"augmented"` (blocks on `(z, w)`,
      twice the width, one Newton step from the carried preimage `w`; exact to
      rounding). Ignored for piecewise-linear activations (relu, leaky relu,
      relu6, hard tanh, ...), whose blocks are always exact (eq. 56-58); the
      identity gets no activation blocks.
    - `newton_steps`: Newton steps per block for `activation="newton"` (default
      3); refused with another option.
    - `reference_point`: the point `c` of the linearization (eq. 63-66), for
      `"linearized"`.
    - `time_scaling`: the grid of each stage: `"linear"` (default) takes uniform
      steps `ds = 1/K`; another scaling (`"smooth"`, `"cubic"` or a
      `TimeScaling`) steps by the increments `tau(t_{k+1}) - tau(t_k)` of a
      uniform grid `t_k` (never by `tau'(t_k) / K`, which does nothing at
      `K = 1`). Uniform steps are 1.6 to 4 times more accurate on the rotations
      (measured), so they are the default.
    - `stretch`: the stretch blocks for `linear="flow"`: `"implicit"` (default;
      implicit Euler on contracting directions, explicit on expanding ones:
      first order and stable for every `K`), `"exact"` (the diagonal exponential,
      exact), or `"explicit"` (explicit Euler: it amplifies null directions,
      `lam = -kappa`, unless `K >= kappa / 2`).
    - `tied`: `True` stores each generator once with a per-block schedule, so
      storage does not grow with `K` times the generator; `False` stores the
      weights of every linear block (stacked for `lax.scan`), for training.
      Activation blocks store per-block scalars either way.
    - `kappa`: the stretch `-kappa` of null directions (eq. 21), for `"flow"`.
    - `n`: the ambient dimension (eq. 19). Default for `"flow"`: the smallest that
      works (`flowjax.flow_parameters`); for `"whole"`: none, each state has its
      layer's width.

    **Returns:** a [`RefinedNet`][], called on one input like `model`.

    **Raises:** `TypeError`/`ValueError` naming the value for a bad `num_steps` or
    option, the errors of `flowjax.plain_net` for unsupported layers or refused
    activations (gelu, silu, softmax, ...).
    """
    K = _check_num_steps(num_steps)
    _check_options(linear, activation, newton_steps, stretch, tied)
    _check_kappa(kappa)
    scaling = get_time_scaling(time_scaling)
    grids = _Grids(K, scaling)
    options = _ActivationOptions(
        activation,
        DEFAULT_NEWTON_STEPS if newton_steps is None else newton_steps,
        _check_reference_point(reference_point),
    )
    if linear == "whole":
        net = plain_net(model)
        stages, width_in = _whole_stages(net, n, grids, options)
        in_size, out_size = net.in_size, net.out_size
    else:
        flow = flow_parameters(model, kappa=kappa, n=n)
        stages = _flow_stages(flow.layers, grids, options, stretch, tied)
        width_in, n, in_size, out_size = flow.n, flow.n, flow.in_size, flow.out_size
    return RefinedNet(Chain(stages), in_size, out_size, width_in, n, K, linear)


def refinement_error(model: Any, refined: Any, xs: Any) -> float:
    """`max |refined(x) - model(x)|` over a batch `xs` and all outputs.

    `xs` has shape `(N, in_size)` (`(N,)` for a `'scalar'` input); both models are
    vmapped and jitted. Fit the order over several `num_steps` with
    `flowjax._certificate.fitted_order`.
    """
    difference = _apply_batch(refined, xs) - _apply_batch(model, xs)
    return float(jnp.max(jnp.abs(difference)))


@eqx.filter_jit
def _apply_batch(model: Any, xs: Array) -> Array:
    return jax.vmap(model)(xs)


# Checking the call


class _ActivationOptions(eqx.Module):
    mode: str = eqx.field(static=True)
    newton_steps: int = eqx.field(static=True)
    reference_point: float = eqx.field(static=True)


def _check_num_steps(num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise TypeError(
            f"refine: num_steps must be a Python int >= 1 (Euler steps per stage), "
            f"got {num_steps!r} of type {type(num_steps).__name__}."
        )
    if num_steps < 1:
        raise ValueError(
            f"refine: num_steps must be >= 1 (Euler steps per stage), got {num_steps}."
        )
    return int(num_steps)


def _check_options(
    linear: Any, activation: Any, newton_steps: Any, stretch: Any, tied: Any
) -> None:
    for name, value, allowed in (
        ("linear", linear, _LINEAR),
        ("activation", activation, _ACTIVATION),
        ("stretch", stretch, _STRETCH),
    ):
        if value not in allowed:
            raise ValueError(
                f"refine: {name}={value!r} is not an option; use one of {allowed}."
            )
    if newton_steps is not None:
        if activation != "newton":
            raise ValueError(
                f"refine: newton_steps={newton_steps!r} applies only to "
                f"activation='newton', got activation={activation!r}."
            )
        if isinstance(newton_steps, bool) or not isinstance(
            newton_steps, int | np.integer
        ):
            raise TypeError(
                f"refine: newton_steps must be a Python int >= 1, got {newton_steps!r}."
            )
        if newton_steps < 1:
            raise ValueError(f"refine: newton_steps must be >= 1, got {newton_steps}.")
    if not isinstance(tied, bool):
        raise TypeError(f"refine: tied must be True or False, got {tied!r}.")


def _check_reference_point(c: Any) -> float:
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(
            f"refine: reference_point must be a real number (the point c of the "
            f"linearization, eq. 63-66), got {c!r}."
        )
    return float(c)


# Building the stages


class _Grids:
    """The homotopy grid of `num_steps` steps, one per dtype (sec. 4.2)."""

    def __init__(self, num_steps: int, scaling: TimeScaling):
        self.num_steps, self.scaling = num_steps, scaling
        self._cache: dict[Any, HomotopyGrid] = {}

    def __call__(self, dtype: Any) -> HomotopyGrid:
        key = jnp.dtype(dtype)
        if key not in self._cache:
            self._cache[key] = homotopy_grid(self.num_steps, self.scaling, key)
        return self._cache[key]


def _activation_stage(
    sigma: Activation, grids: "_Grids", options: _ActivationOptions, dtype: Any
) -> AbstractStage | None:
    """The `K` activation blocks of one layer (eq. 54-72), or `None` for the
    identity."""
    if is_identity(sigma):
        return None
    grid = grids(dtype)
    a = leaky_slope(sigma)
    if a is not None:
        alpha = jnp.asarray(relu_family_weights(grid, a), dtype)
        return ActivationStage(LeakyReluBlock(alpha, a), unroll=LEAKY_RELU_UNROLL)
    if sigma.kind == "piecewise_linear":
        return ActivationStage(homotopy_blocks(sigma, grid, dtype))
    if options.mode == "exact":
        # Each block solves for the preimage in a loop, which nothing fuses across:
        # unrolling would only multiply the compiled program.
        return ActivationStage(homotopy_blocks(sigma, grid, dtype), unroll=1)
    if options.mode == "linearized":
        return ActivationStage(
            linearized_blocks(sigma, grid, options.reference_point, dtype)
        )
    if options.mode == "newton":
        return ActivationStage(newton_blocks(sigma, grid, options.newton_steps, dtype))
    return AugmentedStage(augmented_blocks(sigma, grid, dtype))


def _whole_stages(
    net: PlainNet, n: int | None, grids: "_Grids", options: _ActivationOptions
) -> tuple[list[AbstractStage], int]:
    """`LinearMap(W, b)` then the activation blocks, per layer (eq. 51, 54-72).

    Without `n` each map keeps the layer's own shape `(m, d)`: the same products
    as the plain net, and no padded coordinates to carry."""
    if n is not None:
        _check_whole_n(n, net.widths)
    stages: list[AbstractStage] = []
    for index, layer in enumerate(net.layers):
        W, b = _error_if_not_finite(index, layer.W, layer.b)
        if n is not None:
            W, b = embed_layer(W, b, n)
        stages.append(LinearMap(W, b))
        activation = _activation_stage(layer.sigma, grids, options, W.dtype)
        if activation is not None:
            stages.append(activation)
    return stages, net.widths[0] if n is None else n


def _check_whole_n(n: Any, widths: tuple[int, ...]) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < max(widths):
        raise ValueError(
            f"refine: n={n!r} must be an int >= the widest layer ({max(widths)})."
        )


def _linear_schedule(grid: HomotopyGrid) -> Array:
    """Per-block coefficients `c_k = K ds_k` of the tied linear stages on the
    uniform grid `t_k = k / K`, so that block `k` steps by `ds_k` (eq. 52)."""
    return jnp.asarray(grid.num_steps * grid.ds)


def _flow_stages(
    layers: tuple[LayerFlow, ...],
    grids: "_Grids",
    options: _ActivationOptions,
    stretch: Any,
    tied: bool,
) -> list[AbstractStage]:
    """Per layer: rotate by `V`, stretch, rotate by `U`, translate (eq. 52-53), then
    the activation blocks (eq. 54-72), each stage of `K` blocks."""
    stages: list[AbstractStage] = []
    for layer in layers:
        c = _linear_schedule(grids(layer.W.dtype))
        linear = [
            LinearStage(layer.Q, c),
            StretchStage(layer.lam, c, scheme=stretch),
            LinearStage(layer.P, c),
            TranslationStage(layer.b, c),
        ]
        stages.extend(linear if tied else [stage.untie() for stage in linear])
        activation = _activation_stage(layer.sigma, grids, options, layer.W.dtype)
        if activation is not None:
            stages.append(activation)
    return stages
