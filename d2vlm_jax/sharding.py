"""Sharding core: the one place where placement on the device mesh is decided.

* The mesh has three axes ``(data, fsdp, tensor)``; sizes come from the config, ``-1``
  fills the remaining devices.
* Every parameter carries *logical* axis names (``embed``, ``mlp``, ``heads``, ``vocab``,
  ...), attached with ``flax.linen.with_logical_partitioning`` at init. One rules table
  (``config.sharding.rules``) maps logical names to mesh axes.
* Parameter / optimizer-state shardings are derived from ``jax.eval_shape`` of the init
  function: nothing is allocated on one device first.
* Activations are constrained at the big boundaries with :func:`constrain`, which resolves
  logical names against the mesh set by ``jax.set_mesh`` (inside ``jit``). Outside a mesh
  context it is the identity (the single-device path), never a silent no-op under a mesh.

A mesh axis that does not divide a dimension is dropped for that dimension (that dimension
is replicated over it) and reported once through ``logging``: tiny test configs keep
working on 8 devices, and a full-size config shows in the log what it could not shard.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default logical -> mesh rules. A logical name maps to one mesh axis, a tuple of mesh axes,
# or None (replicated). Names not in the table are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("frames", ("data", "fsdp")),  # frames folded into the batch for the vision tower
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    ("queries", None),
    ("positions", None),
    ("layers", None),  # the stacked axis of scanned layers (models/stacking.py): every chip holds every layer
)

_logged_drops: set[tuple] = set()


def resolve_mesh_shape(axis_sizes: Mapping[str, int] | Sequence[int], num_devices: int) -> dict[str, int]:
    """Mesh axis sizes for ``num_devices`` devices; one size may be ``-1`` (fill).

    Raises:
      ValueError: naming the sizes and device count when they cannot tile the devices.
    """
    if isinstance(axis_sizes, Mapping):
        unknown = set(axis_sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
        sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in axis_sizes]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh: need {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    n = num_devices
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if n % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                f"divide the {n} available devices")
        sizes[fills[0]] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{n} are available")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh. One size may be ``-1`` (fill).

    Args:
      axis_sizes: sizes per mesh axis, as a mapping with keys ``data``, ``fsdp``,
        ``tensor`` or a 3-sequence in that order.
      devices: devices to use (default: all of ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(resolve_mesh_shape(axis_sizes, len(devices)).values())
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain reshape is fine.
        device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_array, MESH_AXES)


def rules_from_config(rules: Iterable[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalizes a rules table (config lists become hashable tuples)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def rules_with(overrides: Mapping[str, Any], base: Sequence[tuple[str, Any]] = DEFAULT_RULES
               ) -> tuple[tuple[str, Any], ...]:
    """``base`` with some logical names mapped differently (new names appended), e.g.
    ``rules_with({"frames": ("data", "fsdp", "tensor")})`` to split the vision tower's frames
    over every device."""
    overrides = dict(overrides)
    out = [(name, overrides.pop(name) if name in overrides else axes) for name, axes in base]
    return rules_from_config(out + list(overrides.items()))


def _mesh_axes_for(name: str | None, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def logical_to_spec(logical_axes: Sequence[str | None], rules: Sequence[tuple[str, Any]],
                    shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``.

    A mesh axis is used at most once (the first dimension that asks for it wins). When
    ``shape`` and ``mesh_shape`` are given, mesh axes that do not divide a dimension are
    dropped for that dimension.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        axes = [a for a in _mesh_axes_for(name, rules) if a not in used]
        if mesh_shape is not None:
            axes = [a for a in axes if a in mesh_shape and mesh_shape[a] > 1]
        if shape is not None and mesh_shape is not None and axes:
            kept = []
            size = shape[dim]
            for a in axes:
                if size % (mesh_shape[a] * math.prod(mesh_shape[k] for k in kept)) == 0:
                    kept.append(a)
            if kept != axes:
                key = (tuple(logical_axes), tuple(shape), tuple(axes))
                if key not in _logged_drops:
                    _logged_drops.add(key)
                    logging.info("sharding: dim %d (%s, size %d) of %s cannot be split over %s; "
                                 "using %s", dim, name, size, tuple(shape), axes, kept or "replicated")
            axes = kept
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_axes_tree(abstract_variables: Any) -> Any:
    """Logical ``PartitionSpec`` per leaf of a (boxed) variable tree from ``eval_shape``."""
    return nn.get_partition_spec(abstract_variables)


def unbox(tree: Any) -> Any:
    """Removes Flax ``LogicallyPartitioned`` boxes, leaving plain arrays / ShapeDtypeStructs."""
    return nn.meta.unbox(tree)


def shardings_for(abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """``NamedSharding`` per leaf, derived from a boxed abstract variable tree.

    Leaves without logical names (e.g. optimizer counters) are replicated.
    """
    logical = logical_axes_tree(abstract_variables)
    shapes = unbox(abstract_variables)
    mesh_shape = dict(mesh.shape)

    def one(spec, leaf):
        names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        names = names + (None,) * (len(leaf.shape) - len(names))
        return NamedSharding(mesh, logical_to_spec(names, rules, leaf.shape, mesh_shape))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: Sequence[tuple[str, Any]]) -> jax.Array:
    """``with_sharding_constraint`` by logical names against the mesh in context.

    Outside ``jax.set_mesh`` (single-device use) there is nothing to constrain to and ``x``
    is returned unchanged; under a mesh the constraint is always applied.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading axis over the ``batch`` mesh axes."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def host_batch_to_global(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Puts this process's slice of the batch onto the mesh as global arrays.

    Each process passes its local rows (``global_batch / process_count`` of them); the
    result is a global ``jax.Array`` per key, sharded over the batch mesh axes.
    """
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim, rules)
        try:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        except ValueError as e:
            raise ValueError(f"batch field {key!r} with local shape {value.shape} cannot be placed "
                             f"with {sharding.spec} on mesh {dict(mesh.shape)}: {e}") from e
    return out


# Compile skew between processes: on CPU, the first collective of a program must be reached
# by every process within Gloo's fixed 30 s; on any backend a host that hits the persistent
# compilation cache (only process 0 writes it) is minutes ahead of one that compiles.
LOCKSTEP_COMPILE_TIMEOUT_S = 3600


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x).__name__)),
                           getattr(x, "sharding", None)) for x in leaves)


def compile_in_lockstep(jitted: Any, name: str) -> Any:
    """``jitted`` for one process; with several, a callable that compiles each new input
    signature ahead of time, waits at a coordination-service barrier (no collective, an
    hour's timeout) until every process has compiled it, and only then runs it.

    Without this, a resumed multi-process job whose process 0 finds the step in the
    persistent compilation cache starts executing while another process is still compiling,
    and the first collective times out (``Gloo context initialization failed``).
    ``name`` makes the barrier ids unique; every process must call with the same inputs in
    the same order (they do: multi-process batches all take the largest buckets).
    """
    if jax.process_count() == 1:
        return jitted
    from orbax.checkpoint import multihost as ocp_multihost  # noqa: PLC0415

    compiled: dict[Any, Any] = {}

    def call(*args, **kwargs):
        key = _signature((args, kwargs))
        if key not in compiled:
            program = jitted.lower(*args, **kwargs).compile()
            ocp_multihost.sync_global_processes(f"compiled {name} #{len(compiled)}",
                                                timeout=LOCKSTEP_COMPILE_TIMEOUT_S)
            compiled[key] = program
        return compiled[key](*args, **kwargs)

    call.jitted = jitted
    return call
