"""A pickle-free model file: a JSON header that says how to rebuild the model, then
its array leaves as written by `eqx.tree_serialise_leaves` (docs/model-file.md).

Layout of a file, in bytes:

    flowjax-model\\n                     the magic line
    {"version": 1, "kind": ...}\\n       the header: one line of UTF-8 JSON
    <payload>                           eqx.tree_serialise_leaves of the model

The header records the `eqx.nn.MLP` architecture (and, for a refined model, the
options of `flowjax.refine`), the payload's length and its SHA-256, so a truncated
or altered file is refused with a message instead of being half read. Leaves are
read back with `numpy.load(..., allow_pickle=False)` and checked against the shapes
and dtypes that the header's architecture implies.
"""

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


MAGIC = b"flowjax-model\n"
VERSION = 1
KINDS = ("mlp", "refined")

ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "identity": jax.nn.identity,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}

_ARCHITECTURE_TYPES: dict[str, type | tuple[type, ...]] = {
    "in_size": (int, str),
    "out_size": (int, str),
    "width_size": int,
    "depth": int,
    "activation": str,
    "final_activation": str,
    "use_bias": bool,
    "use_final_bias": bool,
    "scan": bool,
    "dtype": str,
}
_DTYPES = ("float32", "float64")


# Architecture <-> eqx.nn.MLP


def mlp_architecture(mlp: eqx.nn.MLP) -> dict[str, Any]:
    """The JSON-able architecture of an `eqx.nn.MLP`: everything but its weights.

    **Raises:** `TypeError` for a model that is not an `eqx.nn.MLP`, `ValueError`
    for an activation that has no name in `ACTIVATIONS`.
    """
    if not isinstance(mlp, eqx.nn.MLP):
        raise TypeError(
            f"the model file stores an eqx.nn.MLP, got a {type(mlp).__name__}."
        )
    weight = jax.tree.leaves(mlp.layers)[0]
    return {
        "in_size": mlp.in_size,
        "out_size": mlp.out_size,
        "width_size": mlp.width_size,
        "depth": mlp.depth,
        "activation": _activation_name(mlp.activation, "activation"),
        "final_activation": _activation_name(mlp.final_activation, "final_activation"),
        "use_bias": mlp.use_bias,
        "use_final_bias": mlp.use_final_bias,
        "scan": bool(getattr(mlp, "scan", False)),
        "dtype": jnp.dtype(weight.dtype).name,
    }


def build_mlp(architecture: dict[str, Any], key: jax.Array | None = None) -> eqx.nn.MLP:
    """An `eqx.nn.MLP` with the given architecture (weights drawn from `key`)."""
    arch = check_architecture(architecture)
    extra = {"scan": True} if arch["scan"] else {}
    return eqx.nn.MLP(
        in_size=arch["in_size"],
        out_size=arch["out_size"],
        width_size=arch["width_size"],
        depth=arch["depth"],
        activation=ACTIVATIONS[arch["activation"]],
        final_activation=ACTIVATIONS[arch["final_activation"]],
        use_bias=arch["use_bias"],
        use_final_bias=arch["use_final_bias"],
        dtype=jnp.dtype(arch["dtype"]),
        key=jax.random.key(0) if key is None else key,
        **extra,
    )


def check_architecture(architecture: Any) -> dict[str, Any]:
    """Validate an architecture record; raise `ValueError` naming the bad entry."""
    if not isinstance(architecture, dict):
        raise ValueError("the header's 'architecture' must be a JSON object.")
    missing = sorted(set(_ARCHITECTURE_TYPES) - set(architecture))
    if missing:
        raise ValueError(f"the architecture lacks the entries {missing}.")
    for name, kind in _ARCHITECTURE_TYPES.items():
        value = architecture[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"architecture entry {name!r} has a bad value {value!r}.")
    for name in ("in_size", "out_size"):
        value = architecture[name]
        if value != "scalar" and not (isinstance(value, int) and value >= 1):
            raise ValueError(
                f"architecture entry {name!r} must be a positive integer or 'scalar', "
                f"got {value!r}."
            )
    for name in ("width_size", "depth"):
        if architecture[name] < 0:
            raise ValueError(f"architecture entry {name!r} must be >= 0.")
    for name in ("activation", "final_activation"):
        if architecture[name] not in ACTIVATIONS:
            raise ValueError(
                f"architecture entry {name!r} is {architecture[name]!r}; known "
                f"activations are {sorted(ACTIVATIONS)}."
            )
    if architecture["dtype"] not in _DTYPES:
        raise ValueError(
            f"architecture entry 'dtype' is {architecture['dtype']!r}; allowed are "
            f"{list(_DTYPES)}."
        )
    return dict(architecture)


def _activation_name(fn: Any, where: str) -> str:
    from equinox.nn import _mlp

    if isinstance(fn, eqx.nn.Lambda):
        fn = fn.fn
    if fn is getattr(_mlp, "_identity", None) or isinstance(fn, eqx.nn.Identity):
        return "identity"
    for name, known in ACTIVATIONS.items():
        if fn is known:
            return name
    raise ValueError(
        f"the MLP's {where} ({fn!r}) has no name in the model file format; use one of "
        f"{sorted(ACTIVATIONS)} (the functions in jax.nn, or jnp.tanh)."
    )


# Writing


def save_mlp(path: str | os.PathLike, mlp: eqx.nn.MLP) -> None:
    """Write an `eqx.nn.MLP` to a model file (atomically: temp file + rename)."""
    header = {"kind": "mlp", "architecture": mlp_architecture(mlp)}
    write_model_file(path, header, mlp)


def save_refined(
    path: str | os.PathLike,
    refined: eqx.Module,
    mlp: eqx.nn.MLP,
    refine_options: dict[str, Any],
) -> None:
    """Write a model refined from `mlp` with the `flowjax.refine` options that built
    it (`num_steps`, `linear`, ...; JSON values). Atomic, like `save_mlp`.

    The ambient dimension `refined.n` is recorded too: it depends on the signs of
    the weights' determinants (eq. 19), so the architecture alone cannot give it.
    """
    options = dict(refine_options)
    n = getattr(refined, "n", None)
    if n is not None:
        options.setdefault("n", int(n))
    try:
        json.dumps(options)
    except TypeError as err:
        raise TypeError(f"refine options must be JSON values: {err}") from None
    header = {
        "kind": "refined",
        "architecture": mlp_architecture(mlp),
        "refine": options,
    }
    write_model_file(path, header, refined)


def write_model_file(
    path: str | os.PathLike, header: dict[str, Any], model: Any
) -> None:
    """Write the magic line, `header` (plus version and payload checksum) and the
    leaves of `model`; the file appears under `path` only once it is complete."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    payload = buffer.getvalue()
    full = {
        "version": VERSION,
        **header,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    line = json.dumps(full, sort_keys=True).encode() + b"\n"
    write_atomic(Path(path), MAGIC + line + payload)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, flushed
    and renamed into place, so `path` never holds a partial file."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Reading


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The validated header of a model file (raises `ValueError` or `OSError`)."""
    header, _ = _read(Path(path))
    return header


def load_model(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Read a model file: the model (an `eqx.nn.MLP`, or the module that
    `flowjax.refine` built) and the file's header.

    **Raises:** `OSError` when the file cannot be read; `ValueError` naming the
    problem when it is not a model file, is truncated or altered, records an
    unknown architecture, or holds arrays that do not fit its architecture.
    """
    header, payload = _read(Path(path))
    if header["architecture"]["dtype"] == "float64" and not jax.config.read(
        "jax_enable_x64"
    ):
        raise ValueError(
            f"{path} holds float64 weights; enable float64 first with "
            "jax.config.update('jax_enable_x64', True)."
        )
    like = skeleton(header)
    model = _deserialise(payload, like, path)
    return model, header


def skeleton(header: dict[str, Any]) -> Any:
    """A model with the structure, shapes and dtypes that `header` describes."""
    mlp = build_mlp(header["architecture"])
    if header["kind"] == "mlp":
        return mlp
    from ._refine import refine  # imported late: _refine reads the whole library

    options = dict(header["refine"])
    num_steps = options.pop("num_steps")
    # Identity-like weights (every determinant positive), closed over rather than
    # traced, so the recorded `n` is accepted as it stands (eq. 19).
    proxy = jax.tree.map(_identity_like, mlp, is_leaf=eqx.is_inexact_array)
    return eqx.filter_eval_shape(lambda: refine(proxy, num_steps, **options))


def _identity_like(x: Any) -> Any:
    if not eqx.is_inexact_array(x):
        return x
    if x.ndim < 2:
        return jnp.zeros_like(x)
    eye = jnp.eye(x.shape[-2], x.shape[-1], dtype=x.dtype)
    return jnp.broadcast_to(eye, x.shape)


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(
            f"{path} is not a flowjax model file (it does not begin with "
            f"{MAGIC.decode().strip()!r}); write one with `flowjax save-example-model` "
            "or flowjax.save_mlp."
        )
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError(f"{path} is truncated inside its header line.")
    try:
        header = json.loads(data[len(MAGIC) : end].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} has a header that is not valid JSON ({err})."
        ) from None
    _check_header(header, path)
    payload = data[end + 1 :]
    expected = header["payload_bytes"]
    if len(payload) != expected:
        state = "truncated" if len(payload) < expected else "followed by extra bytes"
        raise ValueError(
            f"{path} is {state}: its header announces {expected} bytes of weights, "
            f"the file holds {len(payload)}."
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"{path} is corrupt: its weights fail the SHA-256 check.")
    return header, payload


def _check_header(header: Any, path: Path) -> None:
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object.")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} has format version {header.get('version')!r}; this flowjax reads "
            f"version {VERSION}."
        )
    if header.get("kind") not in KINDS:
        raise ValueError(
            f"{path} holds a model of kind {header.get('kind')!r}; known kinds are "
            f"{list(KINDS)}."
        )
    for name, kind in (("payload_bytes", int), ("payload_sha256", str)):
        if not isinstance(header.get(name), kind):
            raise ValueError(f"{path}: the header lacks a valid {name!r}.")
    try:
        check_architecture(header.get("architecture"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if header["kind"] == "refined":
        options = header.get("refine")
        if not isinstance(options, dict) or not isinstance(
            options.get("num_steps"), int
        ):
            raise ValueError(
                f"{path}: a refined model's header needs a 'refine' object with an "
                "integer 'num_steps'."
            )


def _deserialise(payload: bytes, like: Any, path: str | os.PathLike) -> Any:
    def load_leaf(f, x):
        if not isinstance(x, jax.Array | jax.ShapeDtypeStruct | np.ndarray):
            return eqx.default_deserialise_filter_spec(f, x)
        value = np.load(f, allow_pickle=False)
        if value.shape != x.shape or value.dtype != x.dtype:
            raise ValueError(
                f"an array of shape {value.shape} and dtype {value.dtype} where the "
                f"architecture needs shape {x.shape} and dtype {x.dtype}"
            )
        return jnp.asarray(value)

    buffer = io.BytesIO(payload)
    try:
        model = eqx.tree_deserialise_leaves(buffer, like, filter_spec=load_leaf)
    except Exception as err:  # numpy and equinox raise many kinds on bad bytes
        where = jax.tree_util.keystr(getattr(err, "path", ()))
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ValueError(
            f"{path}: the weights do not fit the recorded architecture: leaf "
            f"{where or '?'} holds {cause}."
        ) from None
    if buffer.tell() != len(payload):
        raise ValueError(
            f"{path}: the weights do not fit the recorded architecture "
            f"({len(payload) - buffer.tell()} bytes left over)."
        )
    return model
