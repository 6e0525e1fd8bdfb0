"""Velocity fields of a plain net's flow, with diffrax's signature `f(t, y, args)`.

Each stage of a layer runs over one unit of its own time `s` in `[0, 1]` (eq. 24-33,
40-42); a layer glues five stages over `[0, 5]` (eq. 48-49) and a network glues its
layers over `[0, T]` (eq. 50). Every function here is pure and drops into
`diffrax.ODETerm` unchanged.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from ._activations import Activation, activation_velocity
from ._flow_params import LayerFlow, NetworkFlow
from ._time_scaling import TimeScaling


NUM_STAGES = 5
STAGE_NAMES = ("rotate_V", "stretch", "rotate_U", "translate", "activate")


def rotation_field(
    s: Scalar, y: Float[Array, " n"], args: tuple[Float[Array, "n n"], TimeScaling]
) -> Float[Array, " n"]:
    """`v(y, s) = tau'(s) G y` for a skew `G`, `Q` or `P` (eq. 24-25, 28-29)."""
    G, scaling = args
    return scaling.dtau(s) * (G @ y)


def stretch_field(
    s: Scalar, y: Float[Array, " n"], args: tuple[Float[Array, " n"], TimeScaling]
) -> Float[Array, " n"]:
    """`v(y, s) = tau'(s) Lambda y` with `Lambda = diag(lam)` (eq. 26-27)."""
    lam, scaling = args
    return scaling.dtau(s) * lam * y


def translation_field(
    s: Scalar, y: Float[Array, " n"], args: tuple[Float[Array, " n"], TimeScaling]
) -> Float[Array, " n"]:
    """`v(y, s) = tau'(s) b`, the same at every point (eq. 30-33)."""
    b, scaling = args
    return jnp.broadcast_to(scaling.dtau(s) * b, y.shape).astype(y.dtype)


def activation_field(
    s: Scalar, z: Float[Array, " n"], args: tuple[Activation, TimeScaling]
) -> Float[Array, " n"]:
    """`v(z, s) = tau'(s) (sigma - I)(sigma_{tau(s)}^{-1}(z))` (eq. 40-42).

    Each point moves on a straight line from `y` to `sigma(y)`. For the ReLU family
    the field grows like `1 / (1 - tau(s))` near `s = 1` while the trajectories
    stay bounded; `flowjax.flow_model` stops short of `s = 1` and closes the stage
    exactly.
    """
    sigma, scaling = args
    return scaling.dtau(s) * activation_velocity(sigma, z, scaling.tau(s))


def stage_field(
    stage: int, layer: LayerFlow, scaling: TimeScaling
) -> tuple[Callable[..., Array], Any]:
    """Stage `stage` of `layer` as `(f, args)`, with `f(s, y, args)` (eq. 48)."""
    if stage == 0:
        return rotation_field, (layer.Q, scaling)
    if stage == 1:
        return stretch_field, (layer.lam, scaling)
    if stage == 2:
        return rotation_field, (layer.P, scaling)
    if stage == 3:
        return translation_field, (layer.b, scaling)
    if stage == 4:
        return activation_field, (layer.sigma, scaling)
    raise ValueError(f"a layer has stages 0 to 4, got stage {stage}.")


def affine_stage_field(
    s: Scalar,
    y: Float[Array, " n"],
    args: tuple[Float[Array, "n n"], Float[Array, " n"], TimeScaling],
) -> Float[Array, " n"]:
    """`v(y, s) = tau'(s) (G y + c)`: any of the four linear stages (eq. 24-33).

    `(G, c)` is `(Q, 0)`, `(diag(lam), 0)`, `(P, 0)` or `(0, b)`; see
    `linear_stage_generators`.
    """
    G, c, scaling = args
    return scaling.dtau(s) * (G @ y + c)


def linear_stage_generators(
    layer: LayerFlow,
) -> tuple[Float[Array, "4 n n"], Float[Array, "4 n"]]:
    """The four linear stages of a layer as stacked affine generators `(G, c)`."""
    zeros_n = jnp.zeros_like(layer.b)
    zeros_nn = jnp.zeros_like(layer.W)
    G = jnp.stack([layer.Q, jnp.diag(layer.lam), layer.P, zeros_nn])
    c = jnp.stack([zeros_n, zeros_n, zeros_n, layer.b])
    return G, c


def layer_field(
    t: Scalar, y: Float[Array, " n"], args: tuple[LayerFlow, TimeScaling]
) -> Float[Array, " n"]:
    """The glued field of a layer on `[0, 5]`, stage `k` on `[k, k + 1]` (eq. 48-49)."""
    layer, scaling = args
    t = jnp.asarray(t, dtype=y.dtype)
    stage = jnp.clip(jnp.floor(t), 0, NUM_STAGES - 1)
    s = t - stage

    def branch(k):
        f, stage_args = stage_field(k, layer, scaling)
        return lambda s_, y_: f(s_, y_, stage_args)

    branches = [branch(k) for k in range(NUM_STAGES)]
    return jax.lax.switch(stage.astype(jnp.int32), branches, s, y)


def network_field(
    t: Scalar, y: Float[Array, " n"], args: tuple[NetworkFlow, TimeScaling, float]
) -> Float[Array, " n"]:
    """The whole network's field on `[0, T]` (eq. 50).

    With `L` layers, `dt = T / L` and `t_l = l dt`, on `[t_l, t_{l+1}]` the field is
    `(5 / dt) v_l(y, 5 (t - t_l) / dt)`, with `v_l` the layer field (eq. 48-49).
    """
    flow, scaling, T = args
    L = flow.num_layers
    dt = T / L
    t = jnp.asarray(t, dtype=y.dtype)
    index = jnp.clip(jnp.floor(t / dt), 0, L - 1)
    local = NUM_STAGES * (t - index * dt) / dt

    def branch(layer):
        return lambda s_, y_: layer_field(s_, y_, (layer, scaling))

    branches = [branch(layer) for layer in flow.layers]
    v = jax.lax.switch(index.astype(jnp.int32), branches, local, y)
    return (NUM_STAGES / dt) * v
