"""Shared test helpers: random plain nets and case files."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


CASES = Path(__file__).parent / "cases"


def load_case(name: str) -> dict:
    """A JSON case file from tests/cases, with `null` read as NaN."""
    with open(CASES / name) as f:
        data = json.load(f)
    return data


def as_array(value, dtype=np.float64) -> np.ndarray:
    """A nested list with `None` for NaN as an array."""
    return np.array(
        jax.tree.map(
            lambda v: np.nan if v is None else v, value, is_leaf=lambda v: v is None
        ),
        dtype=dtype,
    )


def sequential(weights, biases, activations) -> eqx.nn.Sequential:
    """An `eqx.nn.Sequential` with the given weights, biases and activations."""
    layers = []
    for W, b, sigma in zip(weights, biases, activations, strict=True):
        W = jnp.asarray(W)
        m, d = W.shape
        linear = eqx.nn.Linear(d, m, key=jax.random.key(0), dtype=W.dtype)
        linear = eqx.tree_at(
            lambda lin: (lin.weight, lin.bias), linear, (W, jnp.asarray(b))
        )
        layers.append(linear)
        if sigma is not None:
            layers.append(eqx.nn.Lambda(sigma))
    return eqx.nn.Sequential(layers)


def random_sequential(rng, widths, activation, *, negative_det=False, dtype=np.float64):
    """A plain net with widths `(d_0, ..., d_L)` and random weights of unit scale.

    With `negative_det`, every square layer gets `det W < 0`.
    """
    weights, biases = [], []
    for d, m in zip(widths[:-1], widths[1:], strict=True):
        W = rng.normal(size=(m, d)) / np.sqrt(d)
        if negative_det and m == d and np.linalg.det(W) > 0:
            W[0] = -W[0]
        weights.append(W.astype(dtype))
        biases.append((0.5 * rng.normal(size=m)).astype(dtype))
    activations = [activation] * (len(weights) - 1) + [None]
    return sequential(weights, biases, activations)
