"""Training as the inverse problem of the transport equation (sec. 1, sec. 5 item 7).

Supervised learning looks for a velocity field `v` (and an output function `f`) whose
characteristics carry the inputs `x_i` to states from which `f` reads the labels:
`f(Phi_{0 -> T}(x_i)) ~ y_i` (eq. 3-6). `fit` solves that inverse problem by
gradient descent with any optax transformation, on mini-batches, with optional
regularizers that the flow view suggests (kinetic energy of the transport,
smoothness of the parameters in time), and with pickle-free checkpoints that
resume bit for bit.
"""

import collections
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import os
import pathlib
import time
import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal, NamedTuple, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.core import Tracer
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from ._serialise import write_atomic
from ._sharding import DataParallel, data_parallel


Task = Literal["classification", "regression"]
_TASKS: tuple[str, ...] = get_args(Task)

_MAGIC = b"FLOWJAX-CHECKPOINT\n"
_FORMAT_VERSION = 1

_NAN_ADVICE = (
    "Try a smaller learning rate, float64 (jax.config.update('jax_enable_x64', "
    "True) with float64 data and model), gradient clipping "
    "(optax.clip_by_global_norm), or a stronger kinetic regularization."
)


# Losses and metrics


def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Mean softmax cross-entropy of `logits` (B, C) against integer `labels` (B,).

    The output function `f` of a classifier is the softmax of a linear readout
    (sec. 1, "f is the output function"); this is its negative log-likelihood.
    """
    logits = jnp.asarray(logits)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray(labels)
    )
    return jnp.mean(losses)


def mean_squared_error(predictions: ArrayLike, targets: ArrayLike) -> Array:
    """Mean over the batch of the squared Euclidean error, `mean_i |p_i - y_i|^2`.

    `predictions` and `targets` have shape (B,) or (B, k).
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    squared = jnp.square(predictions - targets.astype(predictions.dtype))
    return jnp.mean(jnp.reshape(squared, (squared.shape[0], -1)).sum(axis=1))


def accuracy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Fraction of rows of `logits` (B, C) whose arg-max is the label (B,)."""
    predicted = jnp.argmax(jnp.asarray(logits), axis=-1)
    return jnp.mean((predicted == jnp.asarray(labels)).astype(jnp.float32))


# Data validation


class _Data(NamedTuple):
    X: Array
    y: Array


def _model_dtype(model: PyTree) -> Any:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    if not leaves:
        return jnp.result_type(float)
    return jnp.result_type(*leaves)


def _first_nonfinite(array: np.ndarray) -> str:
    bad = np.argwhere(~np.isfinite(array))
    count = len(bad)
    names = ("row", "column")[: array.ndim]
    where = ", ".join(
        f"{name} {int(i)}" for name, i in zip(names, bad[0], strict=False)
    )
    return f"{count} non-finite value(s) (NaN or inf), the first at {where}"


def _check_features(X: Any) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(
            f"the inputs X must have shape (num_examples, d), got shape {X.shape}."
        )
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(
        X.dtype, np.complexfloating
    ):
        raise TypeError(f"the inputs X must be real numbers, got dtype {X.dtype}.")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"the inputs X contain {_first_nonfinite(X)}.")
    return X


def _check_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(
            f"class labels must have shape (num_examples,), got shape {y.shape}."
        )
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise ValueError(f"the labels y contain {_first_nonfinite(y)}.")
        fractional = np.flatnonzero(y != np.round(y))
        if fractional.size:
            i = int(fractional[0])
            raise ValueError(
                f"class labels must be integers; label {y[i]} at row {i} is not."
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"class labels must be integers, got dtype {y.dtype}.")
    outside = np.flatnonzero((y < 0) | (y >= num_classes))
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"label {y[i]} at row {i} is outside the allowed range "
            f"0..{num_classes - 1} (the model has {num_classes} outputs, one per "
            f"class); {outside.size} label(s) are out of range."
        )
    return y.astype(np.int32)


def _check_targets(y: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    if out_shape == (1,) and y.ndim == 1:
        y = y[:, None]  # one target a row
    if y.shape[1:] != out_shape:
        raise ValueError(
            f"regression targets must have shape (num_examples, *{out_shape}) to match "
            f"the model's output, got shape {y.shape}."
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"the targets y contain {_first_nonfinite(y)}.")
    return y


def _output_shape(
    model: Callable, X: np.ndarray, dtype: Any, stochastic: bool = False
) -> tuple[int, ...]:
    """The shape of `model(x)` for one row `x` of `X`, traced (no computation).

    A model that cannot take rows of that shape is a `ValueError` naming the shape
    of `X` and, where the model records it (`in_size`), the input shape it takes.
    """
    example = jax.ShapeDtypeStruct(X.shape[1:], dtype)
    try:
        if stochastic:
            key = jax.eval_shape(jr.key, 0)
            out = eqx.filter_eval_shape(_keyed_call, model, example, key)
        else:
            out = eqx.filter_eval_shape(model, example)
    except (TypeError, ValueError) as err:
        wanted = _input_shape(model)
        if wanted == X.shape[1:]:
            raise  # the rows fit: some other fault of the model
        takes = (
            f"the model takes inputs of shape {wanted}"
            if wanted is not None
            else f"the model cannot take them ({' '.join(str(err).split())})"
        )
        raise ValueError(
            f"X has shape {X.shape}: rows of shape {X.shape[1:]}, but {takes}."
        ) from err
    return tuple(out.shape)


def _input_shape(model: Any) -> tuple[int, ...] | None:
    """The shape of one input, from the model's `in_size` (as `eqx.nn.MLP`,
    `FlowNet`) or `in_features` (as `eqx.nn.Linear`); `None` if it has neither."""
    size = getattr(model, "in_size", getattr(model, "in_features", None))
    if size == "scalar":
        return ()
    return (size,) if isinstance(size, int) else None


def _keyed_call(model: Callable, x: Array, key: PRNGKeyArray) -> Array:
    return model(x, key=key)


def _check_data(
    model: Callable, data: Any, task: Task, stochastic: bool = False
) -> _Data:
    """Validate `(X, y)` against the model and the task; cast X to the model dtype.

    With `stochastic`, the model is called as `model(x, key=key)`.
    """
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise TypeError(
            f"data must be a pair (X, y) of arrays, got {type(data).__name__}."
        )
    X, y = _check_features(data[0]), np.asarray(data[1])
    if y.shape[:1] != X.shape[:1]:
        raise ValueError(
            f"X and y must have the same number of examples, got X of shape {X.shape} "
            f"and y of shape {y.shape}."
        )
    dtype = _model_dtype(model)
    out_shape = _output_shape(model, X, dtype, stochastic)
    if task == "classification":
        if len(out_shape) != 1:
            raise ValueError(
                f"a classifier must output one logit per class (shape (C,)), "
                f"this model outputs shape {out_shape}."
            )
        y = _check_labels(y, out_shape[0])
    else:
        y = _check_targets(y, out_shape).astype(dtype)
    return _Data(jnp.asarray(X, dtype=dtype), jnp.asarray(y))


def _check_optimizer(optimizer: Any) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer):
        name = getattr(optimizer, "__name__", repr(optimizer))
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation such as "
            f"optax.adam(1e-3); got the callable {name!r}, which is not one. Call "
            f"an optimizer factory (optax.adam(1e-3), not optax.adam); put a "
            f"learning-rate schedule inside an optimizer "
            f"(optax.adam(learning_rate=schedule))."
        )
    raise TypeError(
        f"optimizer must be an optax.GradientTransformation such as "
        f"optax.adam(1e-3), got {type(optimizer).__name__}."
    )


def _trainable_spec(model: Any) -> Any:
    """The model's own `trainable_spec()` if it has one, else every float array."""
    method = getattr(model, "trainable_spec", None)
    return eqx.is_inexact_array if method is None else method()


def _check_stochastic(model: Any, kinetic: float) -> None:
    """Refuse `stochastic=True` for a model whose call takes no `key`."""
    calls = [("__call__", model)]
    if kinetic:
        calls.append(("forward_with_energy", _forward_with_energy(model)))
    for name, method in calls:
        try:
            parameters = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):  # no signature to read: let the call tell
            continue
        if not any(
            p.name == "key" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD
            for p in parameters
        ):
            raise TypeError(
                f"stochastic=True calls the model as model.{name}(x, key=key), but "
                f"{type(model).__name__}.{name} takes no `key` argument; add one "
                f"(as eqx.nn.Dropout's models do) or leave stochastic=False."
            )


def _task_of(model: Any, task: Task | None) -> Task:
    task = getattr(model, "task", None) if task is None else task
    if task is None:
        raise TypeError(
            f"cannot tell the task of a {type(model).__name__}: pass "
            f"task='classification' or task='regression'."
        )
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}.")
    return task


# The objective


@dataclasses.dataclass(frozen=True)
class _Objective:
    """Data loss plus the optional regularizers, on one batch.

    With `stochastic`, the model is called as `model(x_i, key=k_i)` with the
    example keys `keys` (B,); otherwise as `model(x_i)`.
    """

    task: Task
    kinetic: float
    smoothness: float
    stochastic: bool = False

    def __call__(
        self, model: Any, x: Array, y: Array, keys: Array | None = None
    ) -> tuple[Array, dict]:
        forward = _forward_with_energy(model) if self.kinetic else model
        if self.stochastic:
            out = jax.vmap(lambda x_i, k_i: forward(x_i, key=k_i))(x, keys)
        else:
            out = jax.vmap(forward)(x)
        outputs, energy = out if self.kinetic else (out, None)
        metrics = {}
        if self.task == "classification":
            data_loss = softmax_cross_entropy(outputs, y)
            metrics["accuracy"] = accuracy(outputs, y)
        else:
            data_loss = mean_squared_error(outputs, y)
        loss = data_loss
        metrics["data_loss"] = data_loss
        if energy is not None:
            metrics["kinetic"] = jnp.mean(energy)
            loss = loss + self.kinetic * metrics["kinetic"]
        if self.smoothness:
            metrics["smoothness"] = _smoothness(model)
            loss = loss + self.smoothness * metrics["smoothness"]
        metrics["loss"] = loss
        return loss, metrics


def _forward_with_energy(model: Any) -> Callable:
    method = getattr(model, "forward_with_energy", None)
    if method is None:
        raise TypeError(
            f"kinetic regularization needs a flow model with a `forward_with_energy` "
            f"method (such as flowjax.FlowNet); {type(model).__name__} has none."
        )
    return method


def _smoothness(model: Any) -> Array:
    method = getattr(model, "time_smoothness", None)
    if method is None:
        raise TypeError(
            f"smoothness regularization needs a flow model with parameters on a time "
            f"grid (a `time_smoothness` method, such as flowjax.FlowNet); "
            f"{type(model).__name__} has none."
        )
    return method()


# Checkpoints


def _key_data(key: PRNGKeyArray) -> list[int]:
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    return np.asarray(key).ravel().tolist()


def save_checkpoint(
    path: str | os.PathLike, state: PyTree, header: Mapping[str, Any]
) -> None:
    """Write `state` (any PyTree of arrays) and a JSON `header` to `path`, atomically.

    The file is a magic line, one line of JSON (the header plus the payload's
    length and SHA-256), then the payload: `eqx.tree_serialise_leaves`'s bytes; no
    pickle. It is written to a temporary file in the same directory, flushed to
    disk and moved over `path` with `os.replace`, so an interrupted save leaves
    the previous checkpoint intact.
    """
    path = pathlib.Path(path)
    payload = io.BytesIO()
    eqx.tree_serialise_leaves(payload, state)
    data = payload.getvalue()
    meta = {
        "format": _FORMAT_VERSION,
        "payload_bytes": len(data),
        "payload_sha256": hashlib.sha256(data).hexdigest(),
    }
    head = _MAGIC + json.dumps({**header, **meta}).encode() + b"\n"
    write_atomic(path, head + data)


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict]:
    """Read a checkpoint written by `save_checkpoint`.

    `like` is a PyTree with the structure, shapes and dtypes of the saved state
    (for example a freshly initialised model and optimizer state).

    **Returns:** `(state, header)`.

    **Raises:** `ValueError` if the file is not a checkpoint, has another format
    version, or its payload is truncated or altered (length or SHA-256 differ).
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        if f.readline() != _MAGIC:
            raise ValueError(f"{name!r} is not a flowjax checkpoint.")
        try:
            header = json.loads(f.readline())
        except json.JSONDecodeError as error:
            raise ValueError(f"{name!r} has a damaged header: {error}.") from None
        data = f.read()
    if header.get("format") != _FORMAT_VERSION:
        raise ValueError(
            f"{name!r} has checkpoint format {header.get('format')}, this version "
            f"reads format {_FORMAT_VERSION}."
        )
    if len(data) != header.get("payload_bytes") or hashlib.sha256(
        data
    ).hexdigest() != header.get("payload_sha256"):
        raise ValueError(
            f"{name!r} is damaged: its payload does not match the length and "
            f"SHA-256 recorded in its header (truncated or altered file)."
        )
    state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    return state, header


# The training loop


@dataclasses.dataclass
class History:
    """Metrics recorded during `fit`.

    **Fields:**

    - `steps`: per optimizer step, lists keyed by metric (`loss`, `data_loss`, and
      `accuracy`, `kinetic`, `smoothness` where they apply), all measured on the
      step's mini-batch before the update.
    - `epochs`: per complete epoch, the mean of each step metric over it, and
      `time`, the wall time of the epoch in seconds (the first epoch includes
      compilation; after a resume, the time since the resume).
    """

    steps: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epochs: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def _append(self, table: dict[str, list[float]], metrics: Mapping[str, float]):
        for name, value in metrics.items():
            table.setdefault(name, []).append(float(value))

    def _close_epoch(self, steps_in_epoch: int, seconds: float) -> None:
        means = {
            name: float(np.mean(values[-steps_in_epoch:]))
            for name, values in self.steps.items()
        }
        self._append(self.epochs, {**means, "time": seconds})

    def to_json(self) -> dict:
        return {"steps": self.steps, "epochs": self.epochs}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "History":
        return cls(dict(data["steps"]), dict(data["epochs"]))


class FitResult(NamedTuple):
    """What `fit` returns: unpack as `model, opt_state, history = fit(...)`."""

    model: Any
    opt_state: optax.OptState
    history: History


class TrainingDivergedError(FloatingPointError):
    """The loss or its gradient became non-finite during `fit`.

    **Attributes:** `step` (the failing step, counted from 0), `model` and
    `opt_state` (the last ones whose loss and gradient were finite: the state that
    entered the step before the failing one, or the initial state if step 0
    failed), and `history` (the metrics up to the failure).
    """

    def __init__(self, message: str, *, step: int, model, opt_state, history):
        super().__init__(message)
        self.step = step
        self.model = model
        self.opt_state = opt_state
        self.history = history


def _make_step(
    static: PyTree,
    optimizer: optax.GradientTransformation,
    objective: _Objective,
    layout: DataParallel | None = None,
) -> Callable:
    """One jit-compiled optimizer step on the batch `perm[b*B:(b+1)*B]` of `(X, y)`.

    The model's static part enters in two pieces: `static_rest` (the non-arrays,
    fixed here) and its arrays (an argument of the step, so that equal structures
    with other arrays share the program). With a `layout`, the batch is split over
    the mesh's batch axes and parameters and optimizer state keep their layout (XLA
    adds the gradient all-reduce).
    """
    static_rest = eqx.filter(static, eqx.is_array, inverse=True)

    def loss(params, static_arrays, x, y, keys):
        model = eqx.combine(params, static_arrays, static_rest)
        return objective(model, x, y, keys)

    def step(
        params,
        static_arrays,
        opt_state,
        data: _Data,
        perm,
        start,
        key,
        step_index,
        batch_size: int,
    ):
        index = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
        x, y = data.X[index], data.y[index]
        keys = (
            _example_keys(key, step_index, batch_size) if objective.stochastic else None
        )
        if layout is not None:
            x, y, keys = layout.shard_batch((x, y, keys))
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
            params, static_arrays, x, y, keys
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if layout is not None:
            params, opt_state = layout.constrain_state((params, opt_state))
        leaves = jax.tree.leaves(grads) + [metrics["loss"]]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        return params, opt_state, metrics, finite

    return jax.jit(step, static_argnums=8)


# Compiled steps, shared by the `fit` calls that trace the same program


class _Uncacheable(Exception):
    """An object whose program cannot be told from its value (see `_program_key`)."""


_ATOMS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))
_DEFINITIONS = (
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
    np.ufunc,
    np.dtype,
    inspect.Signature,
)
_MAX_DEPTH = 64
_MAX_KEY_ELEMENTS = 4096


def _program_key(obj: Any, seen: tuple[int, ...] = ()) -> Hashable:
    """A hashable value that is equal for two objects that trace to the same program.

    Functions (optax transformations are closures) are keyed by their code,
    defaults, closure cells and globals; containers, dataclasses (Equinox modules)
    and plain objects by their type and contents; numbers by `repr` (so `-0.0`
    and `0.0` differ); small arrays by dtype, shape and bytes; classes, modules,
    builtins and JAX's own callables (`jnp.tanh`, `jax.nn.relu`) by themselves.
    Reference cycles are keyed by how far back they point.

    **Raises:** `_Uncacheable` for anything else (a tracer, a large array, an
    unhashable object without `__dict__`): its program is then never shared.
    """
    if id(obj) in seen:
        return ("cycle", len(seen) - seen.index(id(obj)))
    if len(seen) > _MAX_DEPTH:
        raise _Uncacheable("too deep")
    seen = (*seen, id(obj))

    def key(x):
        return _program_key(x, seen)

    if isinstance(obj, _ATOMS):
        return (type(obj), repr(obj))
    if isinstance(obj, Tracer):
        raise _Uncacheable("a tracer")
    if isinstance(obj, np.ndarray | np.generic | jax.Array):
        return _array_key(obj)
    if isinstance(obj, tuple | list):
        return (type(obj), tuple(map(key, obj)))
    if isinstance(obj, dict):
        return (type(obj), tuple((key(k), key(v)) for k, v in obj.items()))
    if isinstance(obj, types.FunctionType):
        cells = tuple(key(_cell_contents(cell)) for cell in obj.__closure__ or ())
        return (
            types.FunctionType,
            obj.__code__,
            id(obj.__globals__),  # a module's namespace, alive as long as it
            _globals_key(obj, key),
            key(obj.__defaults__),
            key(obj.__kwdefaults__),
            cells,
            key(obj.__dict__),
        )
    if isinstance(obj, functools.partial):
        return (type(obj), key(obj.func), key(obj.args), key(obj.keywords))
    if isinstance(obj, types.MethodType):
        return (types.MethodType, key(obj.__func__), key(obj.__self__))
    if isinstance(obj, _DEFINITIONS) or _is_jax_callable(obj):
        return ("definition", _hashable(obj))
    if hasattr(obj, "__dict__"):  # Equinox modules, dataclasses, plain objects
        return (type(obj), key(vars(obj)))
    if dataclasses.is_dataclass(obj):  # with __slots__
        return (
            type(obj),
            tuple(key(getattr(obj, f.name)) for f in dataclasses.fields(obj)),
        )
    raise _Uncacheable(type(obj).__name__)


def _globals_key(function: types.FunctionType, key: Callable) -> Hashable:
    """The current values of the globals that `function`'s code (and the code of
    functions defined inside it) reads: a module constant or a helper redefined
    between two `fit` calls changes the key; module-level containers count by
    identity."""
    names: set[str] = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    namespace = function.__globals__

    def value_key(value: Any) -> Hashable:
        # A module-level list, dict or set is typically a registry or a log that
        # the code appends to while tracing: keyed by identity, not contents.
        if isinstance(value, list | dict | set):
            return ("container", id(value))
        return key(value)

    return tuple(
        (name, value_key(namespace[name])) for name in sorted(names & namespace.keys())
    )


def _array_key(array: Any) -> Hashable:
    if array.size > _MAX_KEY_ELEMENTS:
        raise _Uncacheable(f"an array of {array.size} elements")
    weak = bool(getattr(array, "weak_type", False))
    host = np.asarray(array)
    return (type(array), host.dtype.str, host.shape, weak, host.tobytes())


class _EmptyCell:
    """Stands for a closure variable not yet assigned."""


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EmptyCell


def _is_jax_callable(obj: Any) -> bool:
    """JAX's own transformed functions (`jax.jit`, `custom_jvp`): fixed once made."""
    module = type(obj).__module__ or ""
    return callable(obj) and module.split(".")[0] in ("jax", "jaxlib")


def _hashable(obj: Any) -> Any:
    try:
        hash(obj)
    except TypeError:
        raise _Uncacheable(type(obj).__name__) from None
    return obj


_STEP_CACHE: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
_STEP_CACHE_SIZE = 32


def _cached_step(
    static: PyTree,
    optimizer: optax.GradientTransformation,
    objective: _Objective,
    layout: DataParallel | None,
) -> Callable:
    """`_make_step(...)`, reused by later calls whose static parts trace the same.

    The key is `_program_key` of the model's non-array static part, the optimizer
    (its code and closure values: `optax.adam(1e-2)` made twice is one key, with
    another learning rate another), the objective and the layout; the arrays of
    the static part, the data and the shapes are the jitted step's arguments, so
    jit retraces for other shapes or dtypes. The last `_STEP_CACHE_SIZE` steps
    are kept. An optimizer or model that `_program_key` cannot key compiles afresh.
    """
    static_rest = eqx.filter(static, eqx.is_array, inverse=True)
    try:
        key = _program_key((static_rest, optimizer, objective, layout))
        hash(key)
    except (_Uncacheable, TypeError):
        return _make_step(static, optimizer, objective, layout)
    step = _STEP_CACHE.pop(key, None)
    if step is None:
        step = _make_step(static, optimizer, objective, layout)
    _STEP_CACHE[key] = step  # the most recently used last
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    return step


@dataclasses.dataclass(frozen=True)
class _Run:
    """What must match between a checkpoint and the run that resumes from it."""

    key_data: list[int]
    batch_size: int
    num_examples: int
    data_sha256: str
    task: str
    kinetic: float
    smoothness: float
    stochastic: bool = False

    def header(self, step: int, history: History) -> dict:
        return {**dataclasses.asdict(self), "step": step, "history": history.to_json()}

    def check(self, header: Mapping[str, Any], path: str | os.PathLike) -> None:
        defaults = {"stochastic": False}  # absent from older checkpoints
        for name, value in dataclasses.asdict(self).items():
            if header.get(name, defaults.get(name)) != value:
                raise ValueError(
                    f"cannot resume from {os.fspath(path)!r}: it was written with "
                    f"{name}={header.get(name)!r}, this run has {name}={value!r}; "
                    f"resume with the same settings or delete the checkpoint."
                )


class _Saver(NamedTuple):
    path: str | os.PathLike | None
    every: int | None
    run: _Run

    def maybe_save(self, step, total, params, opt_state, history) -> None:
        if self.path is None:
            return
        if step == total or (self.every is not None and step % self.every == 0):
            header = self.run.header(step, history)
            save_checkpoint(self.path, (params, opt_state), header)


def _steps_per_epoch(batch_size: int, num_examples: int) -> int:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data ({num_examples} "
            f"examples); use batch_size <= {num_examples}."
        )
    return num_examples // int(batch_size)


def _total_steps(steps: int | None, epochs: int | None, steps_per_epoch: int) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError(
            f"give exactly one of steps and epochs, got steps={steps}, epochs={epochs}."
        )
    total = steps if epochs is None else epochs * steps_per_epoch
    assert total is not None
    if total < 0:
        raise ValueError(f"the number of steps must be >= 0, got {total}.")
    return int(total)


def _fingerprint(data: _Data) -> str:
    """SHA-256 of the training data, so a resume cannot silently switch data."""
    digest = hashlib.sha256()
    for array in data:
        digest.update(np.ascontiguousarray(jax.device_get(array)).tobytes())
    return digest.hexdigest()


def _epoch_permutation(key: PRNGKeyArray, epoch: int, num_examples: int) -> Array:
    """The order of the examples in `epoch`: a permutation drawn from `(key, epoch)`."""
    return jr.permutation(jr.fold_in(key, epoch), num_examples)


_permutation = jax.jit(_epoch_permutation, static_argnums=2)

# fold_in(key, e) draws the order of epoch e; the model's keys come from another
# branch of the key, fold_in(key, 2**32 - 1), which no epoch number reaches.
_MODEL_KEYS = 2**32 - 1


def _example_keys(key: PRNGKeyArray, step: ArrayLike, batch_size: int) -> Array:
    """The keys `(B,)` given to the model at `step` (counted from 0), one an example.

    `split(fold_in(fold_in(key, 2**32 - 1), step), B)`: a function of the key and
    the step alone, so a resumed run draws the same keys as an uninterrupted one.
    """
    step_key = jr.fold_in(jr.fold_in(key, _MODEL_KEYS), step)
    return jr.split(step_key, batch_size)


def _replicated_key(key: PRNGKeyArray, layout: DataParallel) -> PRNGKeyArray:
    """A full copy of `key` (typed or raw) on every device of the mesh."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = layout.replicate(jr.key_data(key))
        return jr.wrap_key_data(data, impl=jr.key_impl(key))
    return layout.replicate(key)


def _resume(path, params, opt_state, run: _Run, total: int):
    (params, opt_state), header = load_checkpoint(path, (params, opt_state))
    run.check(header, path)
    start = int(header["step"])
    if start > total:
        raise ValueError(
            f"cannot resume from {os.fspath(path)!r}: it is at step {start}, beyond "
            f"the {total} steps asked for; ask for at least {start} steps."
        )
    return params, opt_state, start, History.from_json(header["history"])


def _diverged(step, metrics, good, static, history) -> TrainingDivergedError:
    params, opt_state = good
    loss = metrics["loss"]
    what = "loss" if not math.isfinite(loss) else "gradient"
    message = (
        f"the training {what} became non-finite at step {step} (counted from 0; "
        f"loss {loss}), so training stopped. The last model and optimizer state "
        f"with a finite loss and gradient are attached to this error as .model "
        f"and .opt_state. "
        f"{_NAN_ADVICE}"
    )
    model = eqx.combine(params, static)
    return TrainingDivergedError(
        message, step=step, model=model, opt_state=opt_state, history=history
    )


def _train_loop(step_fn, data, key, start, total, state, static, history, hooks):
    """Run steps `start..total-1`; returns the final `(params, opt_state)`."""
    params, opt_state = state
    steps_per_epoch, callback, saver, layout = hooks
    static_arrays = eqx.filter(static, eqx.is_array)
    if layout is not None:
        static_arrays = layout.replicate(static_arrays)
    batch_size = saver.run.batch_size
    good, perm, clock = state, None, time.perf_counter()
    for step in range(start, total):
        epoch, batch = divmod(step, steps_per_epoch)
        if perm is None or batch == 0:
            perm = _permutation(key, epoch, data.X.shape[0])
            if layout is not None:
                perm = layout.replicate(perm)
        out = step_fn(
            params,
            static_arrays,
            opt_state,
            data,
            perm,
            batch * batch_size,
            key,
            step,
            batch_size,
        )
        # TODO(issue 5): one host sync a step (NaN check, history, callback); for
        # tiny models a lax.scan over several steps would cut the dispatch cost.
        metrics, finite = jax.device_get((out[2], out[3]))
        metrics = {name: float(value) for name, value in metrics.items()}
        if not finite:
            raise _diverged(step, metrics, good, static, history)
        good, (params, opt_state) = (params, opt_state), out[:2]
        history._append(history.steps, metrics)
        if batch + 1 == steps_per_epoch:
            history._close_epoch(steps_per_epoch, time.perf_counter() - clock)
            clock = time.perf_counter()
        if callback is not None:
            callback(step + 1, metrics)
        saver.maybe_save(step + 1, total, params, opt_state, history)
    return params, opt_state


def fit(
    model: Any,
    optimizer: optax.GradientTransformation,
    data: tuple[ArrayLike, ArrayLike],
    *,
    batch_size: int,
    key: PRNGKeyArray,
    steps: int | None = None,
    epochs: int | None = None,
    task: Task | None = None,
    kinetic: float = 0.0,
    smoothness: float = 0.0,
    callback: Callable[[int, dict[str, float]], Any] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    mesh: Mesh | Literal["auto"] | None = None,
    stochastic: bool = False,
) -> FitResult:
    """Fit `model` to `data = (X, y)`: the inverse problem of the transport equation.

    Minimizes, over the model's trainable arrays (those marked by
    `model.trainable_spec()` where the model defines it, else all floating arrays),

    `loss = data_loss + kinetic * KE + smoothness * S`

    with `data_loss` the softmax cross-entropy (classification; `y` integer labels
    `0..C-1`, the model outputs `C` logits) or the mean squared error (regression),
    `KE = mean_i sum_k dt_k |v_k(x_i)|^2` the kinetic energy of the transport and
    `S = sum_l |theta_{l+1} - theta_l|^2` the smoothness of the parameters along time
    (eq. 14-17: adjacent blocks differ by O(dt) for a smooth field).

    One epoch visits the examples in the order of a permutation drawn from
    `fold_in(key, epoch)`, in `len(X) // batch_size` mini-batches (the remainder is
    left out of that epoch). The step is compiled once and run as often as needed,
    and kept for later calls whose model structure (everything but its arrays),
    optimizer (its code and settings), objective and mesh are the same: training
    the same architecture again, with other weights, data or seed, does not
    recompile. The run is deterministic for a given key.

    **Arguments:**

    - `model`: an Equinox module mapping one input of shape `(d,)` to its output,
      e.g. a `flowjax.FlowNet`; any `eqx.nn.MLP` works with `task` given.
    - `optimizer`: any `optax.GradientTransformation`.
    - `data`: `(X, y)`, `X` of shape `(N, d)`; `y` of shape `(N,)` (labels) or the
      model's output shape with a leading `N` (targets).
    - `batch_size`: examples per step, `1 <= batch_size <= N`.
    - `key`: the seed of the batch order (and of the model's keys, see
      `stochastic`).
    - `steps` or `epochs`: how long to train (exactly one; with `resume`, the total
      including the steps already taken).
    - `task`: `'classification'` or `'regression'`; defaults to `model.task`.
    - `kinetic`, `smoothness`: regularization weights (0 switches a term off; both
      need a flow model such as `flowjax.FlowNet`).
    - `callback`: called as `callback(step, metrics)` after every step, with `step`
      the number of steps done so far and `metrics` a dict of floats.
    - `checkpoint_path`: where to save model, optimizer state, step, key and
      history (see `save_checkpoint`); saved every `checkpoint_every` steps (if
      given) and at the end.
    - `resume`: continue from `checkpoint_path` if the file exists (otherwise start
      afresh). The result is bit-identical to an uninterrupted run.
    - `mesh`: `None` (one device), `"auto"` (all visible devices) or a
      `jax.sharding.Mesh` (e.g. `flowjax.make_mesh(model=2)`): data-parallel
      training, each batch split along its first axis over the mesh axes other
      than `"model"` (`batch_size` must be a multiple of their size), the data
      replicated, parameters and optimizer state replicated or, along a
      `"model"` axis, split as `flowjax.param_spec` says. The same steps as on one
      device up to the order of float additions (see `flowjax._sharding`).
    - `stochastic`: call the model as `model(x_i, key=k_i)` (and
      `forward_with_energy(x_i, key=k_i)` with `kinetic`), for models with
      dropout or noise in the forward pass: each example of each step gets its own
      key, `split(fold_in(fold_in(key, 2**32 - 1), step), batch_size)[i]`, a
      function of `key` and the step alone, so resuming stays bit-identical.
      `evaluate` calls the model without a key, in `eqx.nn.inference_mode`.

    **Returns:** a `FitResult` `(model, opt_state, history)`.

    **Example** (a progress bar):

    ```python
    bar = tqdm.tqdm(total=1000)
    callback = lambda step, m: (bar.update(), bar.set_postfix(loss=m["loss"]))
    model, opt_state, history = fit(net, optax.adam(1e-2), (X, y), batch_size=64,
                                    steps=1000, key=jr.key(0), callback=callback)
    ```

    **Raises:** `TypeError` for an optimizer that is not an optax transformation;
    `ValueError` for bad data (labels outside `0..C-1`, NaN, shapes) or a batch
    larger than the data; `TrainingDivergedError` when the loss or gradient turns
    non-finite, carrying the last good model and optimizer state.
    """
    optimizer = _check_optimizer(optimizer)
    task = _task_of(model, task)
    stochastic = bool(stochastic)
    if stochastic:
        _check_stochastic(model, kinetic)
    checked = _check_data(model, data, task, stochastic)
    num_examples = int(checked.X.shape[0])
    steps_per_epoch = _steps_per_epoch(batch_size, num_examples)
    total = _total_steps(steps, epochs, steps_per_epoch)
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}.")
    # TODO(issue 7): checkpoints gather every array on the host; on several hosts
    # with "model"-split parameters each process should write its own shards.
    layout = None if mesh is None else data_parallel(mesh, batch_size)

    params, static = eqx.partition(model, _trainable_spec(model))
    opt_state = optimizer.init(params)
    run = _Run(
        _key_data(key),
        batch_size,
        num_examples,
        _fingerprint(checked),
        task,
        float(kinetic),
        float(smoothness),
        stochastic,
    )
    start, history = 0, History()
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        params, opt_state, start, history = _resume(
            checkpoint_path, params, opt_state, run, total
        )

    if layout is not None:
        params, opt_state = layout.place_state((params, opt_state))
        checked, key = layout.replicate(checked), _replicated_key(key, layout)
    objective = _Objective(task, float(kinetic), float(smoothness), stochastic)
    step_fn = _cached_step(static, optimizer, objective, layout)
    saver = _Saver(checkpoint_path, checkpoint_every, run)
    hooks = (steps_per_epoch, callback, saver, layout)
    params, opt_state = _train_loop(
        step_fn, checked, key, start, total, (params, opt_state), static, history, hooks
    )
    return FitResult(eqx.combine(params, static), opt_state, history)


def evaluate(
    model: Any,
    data: tuple[ArrayLike, ArrayLike],
    *,
    task: Task | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The data loss (and accuracy, for classification) of `model` on `(X, y)`.

    Checks the data as `fit` does. With `batch_size`, evaluates in chunks of that
    many examples (to bound memory); the result is the mean over all examples.
    The model runs in `eqx.nn.inference_mode` (dropout off) and without a key:
    deterministic, also for a model trained with `fit(..., stochastic=True)`.
    """
    model = eqx.nn.inference_mode(model)
    task = _task_of(model, task)
    checked = _check_data(model, data, task)
    num = int(checked.X.shape[0])
    size = (
        num if batch_size is None else _steps_per_epoch(batch_size, num) and batch_size
    )
    objective = _Objective(task, 0.0, 0.0)
    totals: dict[str, float] = {}
    for begin in range(0, num, size):
        x, y = checked.X[begin : begin + size], checked.y[begin : begin + size]
        metrics = _batch_metrics(objective, model, x, y)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(x)
    totals.pop("loss")
    return {name: value / num for name, value in totals.items()}


@eqx.filter_jit
def _batch_metrics(objective: _Objective, model: Any, x: Array, y: Array) -> dict:
    return objective(model, x, y)[1]
