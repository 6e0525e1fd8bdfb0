"""Train a plain MLP in flow coordinates and in plain weights, and compare (eq. 19-23).

Flow coordinates: each layer is `sigma(exp(P) exp(Lambda) exp(Q) y + b)` with `P`,
`Q` skew (`flowjax.FlowCoordinateMLP`), so the rotations stay orthogonal however
the optimizer moves. Plain weights: an `eqx.nn.MLP` of the same widths. Both are
trained by `flowjax.fit` with the same optimizer, data and batch order.

Run: `python experiments/flow_coordinates.py` (a few seconds a data set on a CPU).
"""

import time

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from sklearn.datasets import make_circles, make_moons
from sklearn.model_selection import train_test_split

from flowjax._classifier import FlowCoordinateMLP
from flowjax._training import evaluate, fit


def _data(name: str):
    if name == "moons":
        X, y = make_moons(1000, noise=0.1, random_state=0)
    else:
        X, y = make_circles(1000, factor=0.5, noise=0.05, random_state=0)
    Xtr, Xte, ytr, yte = train_test_split(
        X.astype(np.float32), y, test_size=0.5, random_state=0, stratify=y
    )
    return (Xtr, ytr), (Xte, yte)


def _orthogonality_defect(model: FlowCoordinateMLP) -> float:
    """`max_l |U_l^T U_l - I|` over both rotations of every layer."""
    U, V = model.rotations()
    eye = jnp.eye(U.shape[-1], dtype=U.dtype)
    defects = [jnp.abs(jnp.swapaxes(R, -1, -2) @ R - eye).max() for R in (U, V)]
    return float(max(defects))


def _first_below(values: list[float], level: float) -> float:
    """The 1-based index of the first value below `level` (NaN if none)."""
    below = [i + 1 for i, value in enumerate(values) if value < level]
    return float(below[0]) if below else float("nan")


def compare(name: str, *, width: int = 8, depth: int = 3, epochs: int = 100) -> dict:
    """Train both parametrizations on one data set; return their figures."""
    train, test = _data(name)
    key = jr.key(0)
    models = {
        "flow coordinates": FlowCoordinateMLP.init(
            2, 2, width=width, depth=depth, key=key, dtype=jnp.float32
        ),
        "plain weights": eqx.nn.MLP(
            2, 2, width, depth - 1, activation=jnp.tanh, key=key, dtype=jnp.float32
        ),
    }
    rows = {}
    for label, model in models.items():
        start = time.perf_counter()
        result = fit(
            model,
            optax.adam(1e-2),
            train,
            batch_size=50,
            epochs=epochs,
            key=jr.key(1),
            task="classification",
        )
        seconds = time.perf_counter() - start
        metrics = evaluate(result.model, test, task="classification")
        rows[label] = {
            "test accuracy": metrics["accuracy"],
            "test loss": metrics["data_loss"],
            "final train loss": result.history.epochs["loss"][-1],
            "epochs to train loss < 0.05": _first_below(
                result.history.epochs["loss"], 0.05
            ),
            "ms/epoch": 1e3 * float(np.median(result.history.epochs["time"][1:])),
            "total s": seconds,
        }
        if isinstance(result.model, FlowCoordinateMLP):
            rows[label]["|U^T U - I|"] = _orthogonality_defect(result.model)
    return rows


def main() -> None:
    for name in ("moons", "circles"):
        print(f"{name}:")
        for label, row in compare(name).items():
            figures = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
            print(f"  {label:17s} {figures}")


if __name__ == "__main__":
    main()
