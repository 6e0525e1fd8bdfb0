"""The flow parameters of a plain net: one record a layer, read by every consumer.

A plain layer `sigma(W x + b)` embedded in `R^n` is five stages (eq. 48-49): rotate by
`V = exp(Q)`, stretch by `exp(Lambda)`, rotate by `U = exp(P)`, translate by `b`, then
the activation homotopy. `NetworkFlow` holds those generators for every layer; the
continuous model (`flowjax.flow_model`) and the residual refinement (`flowjax.refine`)
both read it and nothing else.
"""

from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
from jax.core import Tracer
from jaxtyping import Array, Float

from ._activations import Activation
from ._linalg import embed_layer, embedding_dim, layer_generators
from ._plain_net import PlainNet, plain_net


DEFAULT_KAPPA = 30.0


class LayerFlow(eqx.Module):
    """The flow parameters of one embedded plain layer (eq. 19-23).

    **Fields:**

    - `W`: the embedded weight, shape `(n, n)` (eq. 19), kept for the "whole"
      linear map.
    - `b`: the embedded translation, shape `(n,)`.
    - `Q`: skew generator of the first rotation, `V = exp(Q)`, shape `(n, n)` (eq. 20).
    - `lam`: the stretch generator `Lambda = diag(lam)`, shape `(n,)` (eq. 21).
    - `P`: skew generator of the second rotation, `U = exp(P)`, shape `(n, n)`.
    - `sigma`: the activation (static).
    """

    W: Float[Array, "n n"]
    b: Float[Array, " n"]
    Q: Float[Array, "n n"]
    lam: Float[Array, " n"]
    P: Float[Array, "n n"]
    sigma: Activation = eqx.field(static=True)

    @property
    def n(self) -> int:
        return self.W.shape[-1]


class NetworkFlow(eqx.Module):
    """The flow parameters of a whole plain net, embedded in one dimension `n`.

    **Fields:**

    - `layers`: one `LayerFlow` per plain layer, in order.
    - `n`: the ambient dimension (static).
    - `in_size`, `out_size`: the plain net's input and output sizes (an int or
      `'scalar'`, as in `eqx.nn.MLP`; static).
    - `kappa`: the stretch constant used for zero singular values (eq. 21; static).
    """

    layers: tuple[LayerFlow, ...]
    n: int = eqx.field(static=True)
    in_size: int | Literal["scalar"] = eqx.field(static=True)
    out_size: int | Literal["scalar"] = eqx.field(static=True)
    kappa: float = eqx.field(static=True)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_in(self) -> int:
        return 1 if self.in_size == "scalar" else self.in_size

    @property
    def d_out(self) -> int:
        return 1 if self.out_size == "scalar" else self.out_size

    def embed(self, x: Array) -> Float[Array, " n"]:
        """Pad an input of the plain net with zeros into `R^n` (eq. 19)."""
        x = jnp.asarray(x)
        x = jnp.reshape(x, (1,)) if self.in_size == "scalar" else x
        if x.shape != (self.d_in,):
            raise ValueError(
                f"the network takes inputs of shape {(self.d_in,)} "
                f"({self.in_size!r} in eqx.nn.MLP's terms), got shape {x.shape}."
            )
        dtype = jnp.result_type(x, *(layer.W for layer in self.layers))
        return jnp.zeros(self.n, dtype).at[: self.d_in].set(x.astype(dtype))

    def readout(self, y: Float[Array, " n"]) -> Array:
        """Read the output off a state in `R^n` (its first `d_out` entries)."""
        out = y[: self.d_out]
        return jnp.reshape(out, ()) if self.out_size == "scalar" else out


def flow_parameters(
    model: Any, *, kappa: float = DEFAULT_KAPPA, n: int | None = None
) -> NetworkFlow:
    """Compute the flow parameters of a plain net (eq. 19-23).

    **Arguments:**

    - `model`: an `eqx.nn.MLP` or an `eqx.nn.Sequential` of linear layers and
      activations (see `flowjax.plain_net`).
    - `kappa`: stretch constant for zero singular values, `lambda_j = -kappa`
      (eq. 21); null directions are kept to `exp(-kappa)`.
    - `n`: the ambient dimension. By default the largest width, plus one when a
      square full-rank layer of that width has `det W < 0` (eq. 19); under `vmap` or
      `jit`, where the determinant is not known, one is added whenever such a
      square layer exists.

    **Returns:** a `NetworkFlow`.
    """
    net = plain_net(model)
    n = _ambient_dim(net, n)
    layers = tuple(
        _layer_flow(index, layer.W, layer.b, layer.sigma, n, kappa)
        for index, layer in enumerate(net.layers)
    )
    return NetworkFlow(layers, n, net.in_size, net.out_size, float(kappa))


def _ambient_dim(net: PlainNet, n: int | None) -> int:
    weights = [layer.W for layer in net.layers]
    if n is None:
        return embedding_dim(net.widths, weights)
    if n < max(net.widths):
        raise ValueError(
            f"n={n} is smaller than the widest layer ({max(net.widths)}); the "
            f"embedding dimension must be at least {max(net.widths)}."
        )
    if any(isinstance(W, Tracer) for W in weights):
        return n  # a layer with det W < 0 in n dimensions fails in layer_svd's check
    needed = embedding_dim(net.widths, weights)
    if n < needed:
        raise ValueError(
            f"n={n} cannot hold this net's flow: a square layer of width {n} has "
            f"det W < 0, which no pair of rotations can produce in {n} dimensions; "
            f"use n >= {needed} (or leave n unset)."
        )
    return n


def _layer_flow(
    index: int, W: Array, b: Array, sigma: Activation, n: int, kappa: float
) -> LayerFlow:
    W, b = _error_if_not_finite(index, W, b)
    W_hat, b_hat = embed_layer(W, b, n)
    P, lam, Q = layer_generators(W, n, kappa)
    return LayerFlow(W_hat, b_hat, Q, lam, P, sigma)


def _error_if_not_finite(index: int, W: Array, b: Array) -> tuple[Array, Array]:
    if not isinstance(W, Tracer) and not isinstance(b, Tracer):
        return W, b  # concrete weights were checked by `plain_net`
    message = f"layer {index} has a non-finite weight or bias; weights must be finite."
    W = eqx.error_if(W, ~jnp.all(jnp.isfinite(W)), message)
    b = eqx.error_if(b, ~jnp.all(jnp.isfinite(b)), message)
    return W, b
