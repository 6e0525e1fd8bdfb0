"""Accuracy of the adaptive flow model against the plain net it came from (eq. 50).

Run: `python experiments/flow_model_accuracy.py`. For each activation, three random
nets (widths growing, shrinking and equal, square layers with det W < 0) and eight
inputs each, in float64 with rtol 1e-10: prints the largest deviation from the plain
net and the most solver steps one input took.
"""

import functools
import sys
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import random_sequential  # noqa: E402

import flowjax  # noqa: E402


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    "relu6": jax.nn.relu6,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "identity": None,
}


def main() -> None:
    integrator = flowjax.Integrator(
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
        max_steps=100_000,
    )
    rng = np.random.default_rng(0)
    for name, sigma in ACTIVATIONS.items():
        worst, steps = 0.0, 0
        for widths in [(3, 5, 6), (6, 4, 2), (4, 4, 4)]:
            net = random_sequential(rng, widths, sigma, negative_det=True)
            model = flowjax.flow_model(net, integrator=integrator)
            xs = jnp.asarray(rng.normal(size=(8, widths[0])))
            out, taken = jax.jit(jax.vmap(model.solve))(xs)
            worst = max(worst, float(jnp.max(jnp.abs(out - jax.vmap(net)(xs)))))
            steps = max(steps, int(jnp.max(taken)))
        print(f"{name:10s} max|flow - mlp| = {worst:.2e}  max steps = {steps}")


if __name__ == "__main__":
    main()
