"""Reading a plain network as a list of layers x -> sigma(W x + b) (eq. 18)."""

import functools
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float

from ._activations import Activation, activation


class PlainLayer(eqx.Module):
    """One plain layer `x -> sigma(W x + b)` (eq. 18).

    **Fields:** `W` of shape `(m, d)`, `b` of shape `(m,)`, and the elementwise
    activation `sigma` (a static `flowjax.Activation`).
    """

    W: Float[Array, "m d"]
    b: Float[Array, " m"]
    sigma: Activation = eqx.field(static=True)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " m"]:
        return self.sigma(self.W @ x + self.b)


class PlainNet(eqx.Module):
    """A plain network: layers applied in order, with the input and output
    conventions of `eqx.nn.MLP` (`'scalar'` sizes)."""

    layers: tuple[PlainLayer, ...]
    in_size: int | Literal["scalar"] = eqx.field(static=True)
    out_size: int | Literal["scalar"] = eqx.field(static=True)

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths `(d_0, ..., d_L)`: the input size, then each output size."""
        return (self.layers[0].W.shape[1],) + tuple(
            lay.W.shape[0] for lay in self.layers
        )

    def flatten_input(self, x: Array) -> Float[Array, " d"]:
        """The input as a vector (a `'scalar'` input becomes shape `(1,)`)."""
        if self.in_size == "scalar":
            return jnp.reshape(x, (1,))
        return x

    def unflatten_output(self, y: Float[Array, " m"]) -> Array:
        """The output in the network's own convention (`'scalar'` gives shape `()`)."""
        if self.out_size == "scalar":
            return jnp.reshape(y, ())
        return y

    def __call__(self, x: Array) -> Array:
        y = self.flatten_input(x)
        for layer in self.layers:
            y = layer(y)
        return self.unflatten_output(y)


_SUPPORTED = (
    "an eqx.nn.MLP, or an eqx.nn.Sequential of eqx.nn.Linear layers each optionally "
    "followed by one elementwise non-decreasing activation (a function, "
    "eqx.nn.Lambda or eqx.nn.Identity)"
)


def plain_net(model: Any) -> PlainNet:
    """Read `model` as a plain network of layers `sigma(W x + b)` (eq. 18).

    **Arguments:**

    - `model`: an `eqx.nn.MLP` (every option: `'scalar'` sizes, depth 0,
      `use_bias`, `use_final_bias`, `final_activation`, `scan`) or an
      `eqx.nn.Sequential` of `eqx.nn.Linear` layers and activations.

    **Returns:** a `PlainNet` that computes what `model` computes.

    **Raises:** `TypeError` naming the layer when a layer is not supported, and
    `ValueError` for refused activations (see `flowjax.activation`) or non-finite
    weights.
    """
    if isinstance(model, PlainNet):
        return model
    if isinstance(model, eqx.nn.MLP):
        net = _from_mlp(model)
    elif isinstance(model, eqx.nn.Sequential):
        net = _from_sequential(model)
    else:
        raise TypeError(
            f"flowjax cannot read a {type(model).__name__} as a plain network; "
            f"expected {_SUPPORTED}."
        )
    _check_finite(net)
    return net


def _from_mlp(mlp: eqx.nn.MLP) -> PlainNet:
    linears = _mlp_linears(mlp)
    hidden = _mlp_activation(mlp.activation, "activation")
    final = _mlp_activation(mlp.final_activation, "final_activation")
    if mlp.depth == 0 and _mlp_skips_final_activation_at_depth_zero():
        final = activation("identity")
    sigmas = [hidden] * (len(linears) - 1) + [final]
    layers = tuple(
        _layer_from_linear(lin, sig) for lin, sig in zip(linears, sigmas, strict=True)
    )
    return PlainNet(layers, mlp.in_size, mlp.out_size)


@functools.cache
def _mlp_skips_final_activation_at_depth_zero() -> bool:
    """Whether this equinox's `MLP` returns `layer(x)` alone when `depth == 0`.

    Some equinox versions skip `final_activation` there; flowjax mirrors what the MLP
    computes, checked once on a probe.
    """
    with jax.ensure_compile_time_eval():
        probe = eqx.nn.MLP(
            1, 1, 1, 0, final_activation=lambda v: v + 1.0, key=jax.random.key(0)
        )
        x = jnp.ones(1)
        return bool(jnp.all(probe(x) == probe.layers[0](x)))


def _mlp_linears(mlp: eqx.nn.MLP) -> list[eqx.nn.Linear]:
    if not getattr(mlp, "scan", False) or mlp.depth == 0:
        return list(mlp.layers)

    # With `scan=True` the hidden layers are one Linear with stacked weights.
    first, stacked, last = mlp.layers
    hidden = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(mlp.depth - 1)]
    return [first, *hidden, last]


def _mlp_activation(fn: Any, name: str) -> Activation:
    """Undo `eqx.nn.MLP`'s per-neuron copies of its activation and read it."""
    if eqx.is_array(fn) or any(eqx.is_array(x) for x in jax.tree.leaves(fn)):
        raise TypeError(
            f"the MLP's {name} has learnable parameters ({type(fn).__name__}); flowjax "
            "needs a fixed elementwise activation."
        )
    return _read_activation(fn, where=f"the MLP's {name}")


def _equinox_defaults() -> dict[int, Callable]:
    from equinox.nn import _mlp

    defaults: dict[int, Callable] = {}
    if hasattr(_mlp, "_relu"):
        defaults[id(_mlp._relu)] = jax.nn.relu  # pyright: ignore[reportAttributeAccessIssue]
    if hasattr(_mlp, "_identity"):
        defaults[id(_mlp._identity)] = jax.nn.identity  # pyright: ignore[reportAttributeAccessIssue]
    return defaults


def _read_activation(fn: Any, where: str) -> Activation:
    fn = _equinox_defaults().get(id(fn), fn)
    if isinstance(fn, eqx.nn.Lambda):
        fn = fn.fn
    if isinstance(fn, eqx.nn.Identity):
        fn = jax.nn.identity
    try:
        return activation(fn)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _layer_from_linear(lin: eqx.nn.Linear, sigma: Activation) -> PlainLayer:
    W = lin.weight
    b = lin.bias if lin.bias is not None else jnp.zeros(W.shape[0], W.dtype)
    return PlainLayer(W, b, sigma)


def _from_sequential(seq: eqx.nn.Sequential) -> PlainNet:
    layers: list[PlainLayer] = []
    linears: list[eqx.nn.Linear] = []
    pending: eqx.nn.Linear | None = None
    sigma: Activation | None = None
    for index, item in enumerate(_flatten_sequential(seq)):
        if isinstance(item, eqx.nn.Linear):
            if pending is not None:
                layers.append(
                    _layer_from_linear(pending, sigma or activation("identity"))
                )
            pending, sigma = item, None
            linears.append(item)
            continue
        where = f"layer {index} of the Sequential ({type(item).__name__})"
        _check_activation_item(item, where)
        if pending is None:
            raise TypeError(
                f"{where} comes before any eqx.nn.Linear; expected {_SUPPORTED}."
            )
        if sigma is not None:
            raise TypeError(
                f"{where} is a second activation after one Linear layer; flowjax reads "
                "one activation per layer (compose them into one function if it is "
                "non-decreasing)."
            )
        sigma = _read_activation(item, where=where)
    if pending is None:
        raise TypeError(
            f"the Sequential holds no eqx.nn.Linear layer; expected {_SUPPORTED}."
        )
    layers.append(_layer_from_linear(pending, sigma or activation("identity")))
    return PlainNet(tuple(layers), linears[0].in_features, linears[-1].out_features)


def _unsupported_reason(item: Any) -> str:
    """Why a module that is not a Linear layer or an activation cannot be read."""
    if isinstance(item, eqx.nn.Dropout):
        return (
            "Dropout is not supported: the flow model describes the deterministic "
            "net; remove it from the Sequential (at inference it is the identity)"
        )
    if isinstance(item, eqx.nn.LayerNorm | eqx.nn.GroupNorm | eqx.nn.RMSNorm):
        return (
            "normalisation layers are not supported: they mix coordinates, so the "
            "layer is not sigma(W x + b) with an elementwise sigma"
        )
    if isinstance(item, eqx.nn.BatchNorm):
        return "BatchNorm is not supported: it carries state and mixes samples"
    if isinstance(item, eqx.nn.Conv | eqx.nn.ConvTranspose | eqx.nn.Pool):
        return (
            "convolutions and pooling are not supported; flowjax reads dense "
            "layers only (write a convolution as an eqx.nn.Linear on the flattened "
            "input if you need one)"
        )
    if isinstance(item, eqx.nn.Linear | eqx.nn.Lambda | eqx.nn.Identity):
        return ""
    if isinstance(item, eqx.Module):
        return (
            f"{type(item).__name__} is an equinox Module flowjax cannot read (it may "
            "hold parameters or state); wrap a fixed elementwise activation in "
            "eqx.nn.Lambda"
        )
    if not callable(item):
        return f"{item!r} is not callable"
    return ""


def _check_activation_item(item: Any, where: str) -> None:
    """Refuse an item of a Sequential that is neither Linear nor an activation."""
    reason = _unsupported_reason(item)
    if reason:
        raise TypeError(f"{where}: {reason}. Allowed: {_SUPPORTED}.")


def _flatten_sequential(seq: eqx.nn.Sequential) -> list[Any]:
    items: list[Any] = []
    for item in seq.layers:
        items.extend(
            _flatten_sequential(item) if isinstance(item, eqx.nn.Sequential) else [item]
        )
    return items


def _check_finite(net: PlainNet) -> None:
    """Refuse NaN or Inf weights, naming the layer."""
    for index, layer in enumerate(net.layers):
        for name, value in (("W", layer.W), ("b", layer.b)):
            if isinstance(value, Tracer):
                continue  # checked at run time by the consumers (eqx.error_if)
            bad = ~np.isfinite(np.asarray(value))
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"layer {index} has a non-finite {name} entry at {where} "
                    f"({np.asarray(value)[where]}); weights must be finite numbers."
                )
