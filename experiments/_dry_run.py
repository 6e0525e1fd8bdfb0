"""`--dry-run`: check a configuration's shapes and memory without training.

An experiment module defines `plan(config) -> Plan`: the shapes of its data and one
`Training` per distinct program it trains (each built model, with the options it
passes to `common.train`; seeds that repeat a program are counted in `runs`).
`dry_run` builds each model (small arrays: parameters only), stands in for the data
with `jax.ShapeDtypeStruct`s, lowers the very step `flowjax.fit` compiles
(`jax.jit(step).lower`, no compilation, no training), traces one evaluation of the
test chunk (`jax.eval_shape`) and estimates the memory of one training step.

The estimate counts what lives on the device during a step, in bytes:

    memory = data + 2 (params + optimizer state) + gradients + saved activations

`data` is the whole training set (`fit` keeps it on the device), the factor 2 is the
old and the new copy of the state (the step donates nothing) and the saved
activations are the residuals of the backward pass (the leaves of the `jax.vjp`
closure of the batch loss, by `jax.eval_shape`). XLA's temporaries are not counted:
a lower bound up to rematerialization, meant to tell MiB from GiB.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array

from flowjax._training import (
    _batch_metrics,
    _Data,
    _make_step,
    _Objective,
    _trainable_spec,
)

from . import _common as common


class DataShape(NamedTuple):
    """A data set by its sizes: `n_train` and `n_test` examples of `features`
    float32 inputs, integer labels in `0..classes-1`."""

    n_train: int
    n_test: int
    features: int
    classes: int


class Training(NamedTuple):
    """One program that `run` trains: `label`, `build()` (the initial model),
    the options of `common.train` (`steps`, `batch_size`, `learning_rate`, and
    `task`, `kinetic`, `smoothness`, `stochastic` where given), and how many
    `runs` (seeds) train that same program on data of `data`'s shape."""

    label: str
    build: Callable[[], Any]
    options: dict[str, Any]
    runs: int = 1


class Plan(NamedTuple):
    """Everything an experiment trains at one configuration."""

    data: DataShape
    trainings: list[Training]


DIGITS = DataShape(1347, 450, 64, 10)  # sklearn's 1797 digits, a quarter for tests


def _bytes(tree: Any) -> int:
    """Bytes of every array (or `ShapeDtypeStruct`) leaf of `tree` (a typed PRNG
    key counts its key data)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves))


def _zeros_like(tree: Any) -> Any:
    """`tree` with each `ShapeDtypeStruct` leaf made a zero array of its shape.

    The model is built by `jax.eval_shape` and then filled with zeros from NumPy:
    its values do not matter for lowering, and initializing it for real would
    compile every random draw of every new shape.
    """

    def zeros(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        return leaf

    return jax.tree.map(zeros, tree)


def _data_structs(n: int, data: DataShape) -> _Data:
    """`(X, y)` of `n` examples as shapes: X float32 `(n, features)`, y int32."""
    X = jax.ShapeDtypeStruct((n, data.features), common.DTYPE)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    return _Data(cast(Array, X), cast(Array, y))  # shapes stand in for arrays


def _objective(model: Any, options: dict[str, Any]) -> _Objective:
    task = options.get("task") or getattr(model, "task", None)
    if task is None:
        raise ValueError(
            f"the plan's training of a {type(model).__name__} names no task; pass "
            f"task='classification' or 'regression' in its options."
        )
    return _Objective(
        task,
        float(options.get("kinetic", 0.0)),
        float(options.get("smoothness", 0.0)),
        bool(options.get("stochastic", False)),
    )


def _residuals(objective, params, static, batch: _Data, keys) -> Any:
    """The arrays the backward pass of the batch loss keeps (shapes only)."""

    def saved(p, x, y, k):
        def loss(p):
            return objective(eqx.combine(p, static), x, y, k)[0]

        return jax.vjp(loss, p)[1]

    return jax.eval_shape(saved, params, batch.X, batch.y, keys)


def check_training(training: Training, data: DataShape) -> dict[str, Any]:
    """Lower `training`'s step and trace its evaluation; its shapes and bytes."""
    model = _zeros_like(eqx.filter_eval_shape(training.build))
    options = training.options
    batch_size = min(options["batch_size"], data.n_train)
    objective = _objective(model, options)
    optimizer = optax.adam(options["learning_rate"])
    params, static = eqx.partition(model, _trainable_spec(model))
    opt_state = optimizer.init(params)
    train_set = _data_structs(data.n_train, data)
    key = jr.key(0)
    start = time.perf_counter()
    step = cast(Any, _make_step(static, optimizer, objective))  # a jax.jit
    lowered = step.lower(
        params,
        eqx.filter(static, eqx.is_array),
        opt_state,
        train_set,
        jax.ShapeDtypeStruct((data.n_train,), jnp.int32),
        0,
        key,
        0,
        batch_size,
    )
    lower_seconds = time.perf_counter() - start
    out_params, out_state, metrics, _ = lowered.out_info
    keys = jax.eval_shape(lambda: jr.split(key, batch_size))
    batch = _data_structs(batch_size, data)
    residuals = _residuals(
        objective, params, static, batch, keys if objective.stochastic else None
    )
    chunk = common._evaluation_chunk(data.n_train, data.n_test) or data.n_test
    test_chunk = _data_structs(chunk, data)
    evaluation = eqx.filter_eval_shape(
        _batch_metrics,
        _Objective(objective.task, 0.0, 0.0),
        eqx.nn.inference_mode(model),
        test_chunk.X,
        test_chunk.y,
    )
    figures = {
        "data": _bytes(train_set),
        "params": _bytes(params),
        "optimizer_state": _bytes(opt_state),
        "gradients": _bytes(params),
        "activations": _bytes(residuals),
    }
    memory = (
        figures["data"]
        + 2 * (figures["params"] + figures["optimizer_state"])
        + figures["gradients"]
        + figures["activations"]
    )
    return {
        "label": training.label,
        "runs": training.runs,
        "steps": options["steps"],
        "parameters": common.parameter_count(model),
        "parameter_leaves": [list(a.shape) for a in jax.tree.leaves(params)],
        "batch": [batch_size, data.features],
        "train_set": [data.n_train, data.features],
        "eval_chunk": [chunk, data.features],
        "step_outputs_match": _same_shapes(
            (out_params, out_state), (params, opt_state)
        ),
        "metrics": sorted(metrics),
        "eval_metrics": sorted(evaluation),
        "bytes": figures,
        "memory_bytes": memory,
        "lower_seconds": round(lower_seconds, 3),
    }


def _same_shapes(a: Any, b: Any) -> bool:
    """Whether two trees have the same structure, shapes and dtypes."""
    shapes = [jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t) for t in (a, b)]
    return jax.tree.structure(a) == jax.tree.structure(b) and shapes[0] == shapes[1]


def dry_run(module: ModuleType, scale: str) -> dict[str, Any]:
    """The dry run of `module` at `scale`: one `check_training` per program."""
    if scale not in module.CONFIGS:
        raise ValueError(
            f"experiment {module.NAME!r} has no scale {scale!r}; use one of "
            f"{tuple(module.CONFIGS)}."
        )
    config = module.CONFIGS[scale]
    plan: Plan = module.plan(config)
    checks = [check_training(t, plan.data) for t in plan.trainings]
    return {
        "experiment": module.NAME,
        "scale": scale,
        "config": dataclasses.asdict(config),
        "data": plan.data._asdict(),
        "trainings": checks,
        "fits": sum(c["runs"] for c in checks),
        "optimizer_steps": sum(c["runs"] * c["steps"] for c in checks),
        "max_memory_bytes": max(c["memory_bytes"] for c in checks),
        "backend": jax.default_backend(),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(record: dict[str, Any]) -> str:
    """What `--dry-run` prints: a table of the programs and the totals."""
    rows = [
        {
            "training": c["label"],
            "runs": c["runs"],
            "steps": c["steps"],
            "parameters": c["parameters"],
            "batch": "x".join(map(str, c["batch"])),
            "eval chunk": "x".join(map(str, c["eval_chunk"])),
            "params MiB": _mib(c["bytes"]["params"]),
            "activations MiB": _mib(c["bytes"]["activations"]),
            "memory/step MiB": _mib(c["memory_bytes"]),
            "lower s": f"{c['lower_seconds']:.2f}",
        }
        for c in record["trainings"]
    ]
    data = record["data"]
    return (
        f"{record['experiment']} ({record['scale']}) dry run: lowered, not compiled "
        f"or trained ({record['backend']})\n"
        f"data: {data['n_train']} training and {data['n_test']} test examples of "
        f"{data['features']} features, {data['classes']} classes\n"
        f"{common.format_table(list(rows[0]), rows)}\n"
        f"{record['fits']} fits, {record['optimizer_steps']} optimizer steps in all; "
        f"largest estimated memory per step {_mib(record['max_memory_bytes'])} MiB "
        f"(data + 2 x (params + Adam state) + gradients + saved activations)"
    )
