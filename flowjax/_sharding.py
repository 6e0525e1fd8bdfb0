"""Scaling out on JAX's own sharding: meshes, data-parallel training, sharded
refinement and evaluation, precision casts and multi-host start-up.

Everything here is a thin layer over `jax.sharding` (`Mesh`, `NamedSharding`,
`PartitionSpec`), sharding constraints inside `jax.jit`, `jax.shard_map` and
`jax.distributed`: XLA partitions the programs and inserts the collectives; none is
written by hand.

- Training (`flowjax.fit(..., mesh=...)`): each mini-batch is split along its batch
  axis over the mesh axes other than `"model"`; parameters and optimizer state are
  replicated, or, on a mesh with a `"model"` axis, wide parameter matrices are split
  along it ([`param_spec`][]). The mean loss over the batch becomes a sum of
  per-device partial sums, so results agree with one device up to the order of
  float additions.
- Refinement and evaluation ([`refine_many`][], [`evaluate_sharded`][]): one model
  (or one input) is independent of the others, so each device maps over its own
  slice of the stack (or batch) with `jax.shard_map`, with no communication.
"""

import argparse
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, ArrayLike, PyTree

from ._refine import RefinedNet, refine


DATA_AXIS = "data"
MODEL_AXIS = "model"
DISTRIBUTED_FLAG = "--distributed"
MeshLike = Mesh | Literal["auto"] | None


# Meshes


def make_mesh(num_devices: int | None = None, *, model: int = 1) -> Mesh:
    """A `("data", "model")` mesh of shape `(num_devices // model, model)`.

    Uses the first `num_devices` of `jax.devices()` (all of them by default; on a
    multi-host run, the devices of every process), laid out by `jax.make_mesh`
    for the machine's topology. Both axes are `AxisType.Auto`: XLA propagates
    shardings from the constraints flowjax places.

    **Raises:** `ValueError` if `num_devices` is not between 1 and the number of
    devices, or `model` does not divide it.
    """
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise TypeError(f"make_mesh: num_devices must be an int, got {count!r}.")
    if not 1 <= count <= len(devices):
        raise ValueError(
            f"make_mesh: num_devices={count} must be between 1 and the "
            f"{len(devices)} visible device(s)."
        )
    if isinstance(model, bool) or not isinstance(model, int | np.integer):
        raise TypeError(f"make_mesh: model must be an int, got {model!r}.")
    if model < 1 or count % model:
        raise ValueError(
            f"make_mesh: model={model} must be a positive divisor of the number of "
            f"devices ({count})."
        )
    shape = (int(count) // int(model), int(model))
    auto = (AxisType.Auto, AxisType.Auto)
    return jax.make_mesh(
        shape, (DATA_AXIS, MODEL_AXIS), axis_types=auto, devices=devices[:count]
    )


def as_mesh(mesh: MeshLike) -> Mesh:
    """`mesh` as a `Mesh` with `Auto` axes; `None` or `"auto"` give `make_mesh()`.

    A mesh with `Explicit` axes is rebuilt on the same devices and axis names with
    `Auto` axes, the mode in which flowjax's sharding constraints are written.
    """
    if mesh is None or (isinstance(mesh, str) and mesh == "auto"):
        return make_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be None, 'auto' or a jax.sharding.Mesh, got {mesh!r}."
        )
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, (AxisType.Auto,) * mesh.devices.ndim)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: every axis but `"model"`."""
    axes = tuple(str(name) for name in mesh.axis_names if name != MODEL_AXIS)
    if not axes:
        raise ValueError(
            f"the mesh has only a {MODEL_AXIS!r} axis (axes {mesh.axis_names}); add "
            f"a batch axis such as {DATA_AXIS!r}, e.g. with make_mesh()."
        )
    return axes


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """How a parameter (or optimizer-state) array of `shape` is laid out.

    Replicated (`P()`), except on a mesh whose `"model"` axis has size `k > 1`: an
    array of rank >= 2 is split over `"model"` along whichever of its last two
    axes is the longer one divisible by `k` (a two-layer field's `W1 (L, m, n)`
    and `W2 (L, n, m)` are both split along the hidden width `m`). Optimizer
    moments have their parameter's shape, hence its layout.
    """
    k = dict(mesh.shape).get(MODEL_AXIS, 1)
    if k == 1 or len(shape) < 2:
        return P()
    last_two = (len(shape) - 2, len(shape) - 1)
    divisible = [axis for axis in last_two if shape[axis] % k == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda a: (shape[a], a))
    return P(*([None] * axis), MODEL_AXIS)


# Data-parallel training


def _place(value: Any, sharding: NamedSharding) -> Any:
    """Put one array on the mesh; each process supplies its devices' slices."""
    if not eqx.is_array(value):
        return value
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


class DataParallel(NamedTuple):
    """The layout of data-parallel training on `mesh` (used by `flowjax.fit`).

    Batches are split along their first axis over `batch_axes(mesh)`; the
    training data and the batch order are replicated; parameters and optimizer
    state follow [`param_spec`][].
    """

    mesh: Mesh

    @property
    def batch(self) -> NamedSharding:
        """Split along the first axis over the batch axes."""
        return NamedSharding(self.mesh, P(batch_axes(self.mesh)))

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device."""
        return NamedSharding(self.mesh, P())

    @property
    def num_shards(self) -> int:
        """Into how many pieces a batch is split."""
        sizes = dict(self.mesh.shape)
        return int(np.prod([sizes[name] for name in batch_axes(self.mesh)]))

    def state_shardings(self, tree: PyTree) -> PyTree:
        """A `NamedSharding` for each array of `tree` (parameters, optimizer
        state), by `param_spec` of its shape; other leaves are kept."""

        def sharding(x):
            if not eqx.is_array(x):
                return None
            return NamedSharding(self.mesh, param_spec(tuple(x.shape), self.mesh))

        return jax.tree.map(sharding, tree)

    def place_state(self, tree: PyTree) -> PyTree:
        """Put parameters or optimizer state on the mesh (outside jit)."""

        def place(x):
            if not eqx.is_array(x):
                return x
            spec = param_spec(tuple(x.shape), self.mesh)
            return _place(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(place, tree)

    def replicate(self, tree: PyTree) -> PyTree:
        """Put a full copy of every array of `tree` on every device (outside jit)."""
        return jax.tree.map(lambda x: _place(x, self.replicated), tree)

    def shard_batch(self, tree: PyTree) -> PyTree:
        """Inside jit: constrain a batch `(B, ...)` to be split along `B`."""
        return jax.lax.with_sharding_constraint(tree, self.batch)

    def constrain_state(self, tree: PyTree) -> PyTree:
        """Inside jit: keep parameters and optimizer state in their layout, so
        that the step's outputs match its inputs and it never recompiles."""
        arrays, rest = eqx.partition(tree, eqx.is_array)
        shardings = self.state_shardings(arrays)
        arrays = jax.lax.with_sharding_constraint(arrays, shardings)
        return eqx.combine(arrays, rest)

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch that the batch axes do not split evenly."""
        if batch_size % self.num_shards:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the number of "
                f"devices it is split over ({self.num_shards}: mesh axes "
                f"{batch_axes(self.mesh)} of the mesh {dict(self.mesh.shape)})."
            )


def data_parallel(mesh: Mesh | Literal["auto"], batch_size: int) -> DataParallel:
    """The `DataParallel` layout of `mesh` (`"auto"`: all devices), checked
    against `batch_size`."""
    layout = DataParallel(as_mesh(mesh))
    layout.check_batch_size(batch_size)
    return layout


# Mapping over a leading axis, one slice a device


def stack_size(tree: PyTree, what: str) -> int:
    """The common leading-axis length of the arrays of a stacked `tree`."""
    arrays = [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]
    sizes = {x.shape[0] if x.ndim else None for x in arrays}
    if not arrays or len(sizes) != 1 or None in sizes:
        shapes = [tuple(x.shape) for x in arrays]
        raise ValueError(
            f"{what}: expected a stack whose arrays all share a leading axis (e.g. "
            f"made with eqx.filter_vmap), got array shapes {shapes}."
        )
    (size,) = sizes
    assert size is not None
    return int(size)


def _pad_leading(tree: PyTree, extra: int) -> PyTree:
    """Append `extra` copies of the last entry along the leading axis."""
    if extra == 0:
        return tree

    def pad(x):
        if not eqx.is_array(x):
            return x
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)


def _map_shards(
    fn: Callable[[Any, Any], Any],
    stack: PyTree,
    shared: PyTree,
    mesh: Mesh,
    *,
    sequential: bool = False,
) -> PyTree:
    """`fn(item, shared)` for every item of `stack` (its leading axis), inside jit,
    each device taking an equal slice of the (padded) stack and a copy of
    `shared`; a device maps over its slice with `vmap`, or with `lax.map` (one
    item at a time) if `sequential`."""
    size = stack_size(stack, "sharded map")
    num_devices = mesh.devices.size
    padded = _pad_leading(stack, -size % num_devices)
    stack_dynamic, stack_static = eqx.partition(padded, eqx.is_array)
    shared_dynamic, shared_static = eqx.partition(shared, eqx.is_array)
    out_static = []

    def local(stack_part, shared_part):
        shared_full = eqx.combine(shared_part, shared_static)

        def one(item):
            out = fn(eqx.combine(item, stack_static), shared_full)
            out_dynamic, static = eqx.partition(out, eqx.is_array)
            out_static.append(static)
            return out_dynamic

        return jax.lax.map(one, stack_part) if sequential else jax.vmap(one)(stack_part)

    spec = P(tuple(mesh.axis_names))
    # check_vma=False: eqx.error_if's lax.cond joins a per-device branch with a
    # device-invariant one, which the varying-axes check refuses.
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False
    )
    out_dynamic = mapped(stack_dynamic, shared_dynamic)
    out = eqx.combine(out_dynamic, out_static[0])
    return jax.tree.map(lambda x: x[:size] if eqx.is_array(x) else x, out)


def _is_cpu_mesh(mesh: Mesh) -> bool:
    return mesh.devices.flat[0].platform == "cpu"


@eqx.filter_jit
def _refine_stack(models, num_steps, options, mesh) -> RefinedNet:
    def refine_one(model, _):
        return refine(model, num_steps, **dict(options))

    # TODO(issue 7): on CPU, one net at a time. With jaxlib 0.10.2 and 65 x 65
    # layers, batched LAPACK calls (SVD, eigh of `flow_parameters`) of 2+ nets
    # deadlocked on 8 simulated devices (they split their batch over the thread
    # pool the devices' programs occupy), and vmap over 2 nets on one device ran
    # over 100 s against 8.5 s for lax.map; GPU and TPU keep the batched vmap.
    sequential = _is_cpu_mesh(mesh)
    return _map_shards(refine_one, models, None, mesh, sequential=sequential)


def refine_many(
    models: PyTree, num_steps: int, *, mesh: MeshLike = None, **options: Any
) -> RefinedNet:
    """Refine a stack of plain nets of one shape, the stack split over devices.

    `models` is a stack of `S` nets (every array with a leading axis of length
    `S`, e.g. `eqx.filter_vmap(lambda k: eqx.nn.MLP(..., key=k))(keys)`). Each
    device refines its slice of the stack with `eqx.filter_vmap(refine)` inside
    `jax.shard_map` (no communication; on CPU devices one net at a time, with
    `lax.map`, which avoids a deadlock and a slow path of batched LAPACK calls in
    XLA's CPU runtime); `S` need not divide the number of devices (the stack is
    padded with copies of its last net, then cut back).

    **Arguments:** `num_steps` and `**options` as in `flowjax.refine`; `mesh`: a
    `Mesh` (all its axes carry the stack), `"auto"` or `None` (all devices).

    **Returns:** the stacked `RefinedNet` (leading axis `S`), equal to
    `eqx.filter_vmap(lambda m: refine(m, num_steps, **options))(models)`; call
    one with `eqx.filter_vmap` or index it with `jax.tree.map(lambda a: a[i], .)`.
    """
    stack_size(models, "refine_many")
    options_key = tuple(sorted(options.items()))
    return _refine_stack(models, num_steps, options_key, as_mesh(mesh))


@eqx.filter_jit
def _evaluate(model, xs, mesh):
    return _map_shards(lambda x, m: m(x), xs, model, mesh)


def evaluate_sharded(
    model: Callable[[Array], Array],
    xs: ArrayLike,
    *,
    mesh: MeshLike = None,
    dtype: Any = None,
) -> Array:
    """`jax.vmap(model)(xs)` with the batch `xs` (`(N, ...)`) split over devices.

    The model is copied to every device; each maps over its slice of the batch
    (padded to a multiple of the number of devices, then cut back to `N`).
    With `dtype` (e.g. `jnp.bfloat16`), the model's and the inputs' floating
    arrays are cast to it first ([`cast_tree`][]), and the output has that dtype.

    **Returns:** the outputs, shape `(N, *out_shape)`, split over the mesh.
    """
    xs = jnp.asarray(xs)
    if xs.ndim == 0:
        raise ValueError(
            f"evaluate_sharded: xs must have a leading batch axis, got shape "
            f"{xs.shape}."
        )
    if dtype is not None:
        model, xs = cast_tree((model, xs), dtype)
    return _evaluate(model, xs, as_mesh(mesh))


# Precision


def cast_tree(tree: PyTree, dtype: Any) -> PyTree:
    """`tree` with every floating-point array cast to `dtype`; other leaves
    (integer arrays, static fields, functions) are kept.

    `cast_tree(refined, jnp.bfloat16)` gives the bfloat16 forward of a refined net;
    every block respects its input's dtype, so nothing is promoted back.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"cast_tree: dtype must be a floating dtype, got {dtype}.")

    def cast(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


# Multi-host start-up


def add_distributed_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--distributed` to a command line (pass its value to
    `maybe_initialize_distributed`)."""
    parser.add_argument(
        DISTRIBUTED_FLAG,
        action="store_true",
        help=(
            "call jax.distributed.initialize() before anything else touches JAX "
            "(multi-host runs: TPU pod slices, SLURM, Open MPI clusters)"
        ),
    )


def maybe_initialize_distributed(flag: bool, **kwargs: Any) -> bool:
    """Call `jax.distributed.initialize(**kwargs)` if `flag`; return `flag`.

    Must run in every process before JAX is otherwise used. Without `kwargs`,
    JAX detects the coordinator, the number of processes and this process's index
    from the environment (Cloud TPU pod slices, SLURM, Open MPI, ...); pass
    `coordinator_address=`, `num_processes=`, `process_id=` elsewhere. A second
    call in the same process does nothing.
    """
    if not flag:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)
    return True
