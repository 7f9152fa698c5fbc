"""Layer stacks: ``nn.scan`` over identical layers, and the one place that converts parameter
trees between the *unrolled* layout (``layers_0 .. layers_{L-1}``, one subtree per layer, 1:1
with HF checkpoints) and the *scanned* layout (one subtree ``layers`` whose leaves carry a
leading ``[L, ...]`` axis, logical axis name ``layers``).

A :class:`LayerStack` names where a model keeps such a stack (``("llm",)``: the decoder's
``layers_{i}``; ``("video", "vision")``: the EVA tower's ``blocks_{i}``; ``("video",
"qformer")``: the Q-Former's ``layers_{i}`` scanned as blocks of two, cross-attention layer
first) and which layout the model uses. :func:`to_layout` converts any pytree — params,
their ``ShapeDtypeStruct``/sharding trees, optimizer states, a checkpoint's metadata —
towards the layouts the stacks ask for; the source layout is read from which keys exist, so
the same call loads an old unrolled checkpoint into a scanned model and back.

With ``block = f > 1`` (the Q-Former) a scanned step runs ``f`` consecutive layers: unrolled
layer ``i`` is ``layers/sub_{i % f}`` at index ``i // f``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

LAYERS_AXIS = "layers"  # logical axis name of the stacked dimension (sharding rule: unsharded)


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """A stack of ``count`` layers under the module at ``path``.

    Attributes:
      path: parameter-tree path of the module holding the stack, relative to the tree being
        converted (``("llm",)``; ``()`` for a bare decoder tree). It matches any node whose
        dict-key path ends with it, so optimizer states (``opt_state/.../mu/llm``) convert too.
      unrolled_prefix: child names of the unrolled layout (``"layers_"`` -> ``layers_{i}``).
      scanned_name: the child holding the stacked layers.
      count: number of layers.
      block: layers per scanned step; ``> 1`` nests ``sub_{j}`` children under ``scanned_name``.
      scanned: the layout wanted (True = stacked).
    """
    path: tuple[str, ...]
    unrolled_prefix: str
    scanned_name: str
    count: int
    block: int = 1
    scanned: bool = False

    def __post_init__(self):
        # an unrolled stack needs no whole blocks (a 1-layer Q-Former with cross-attention
        # every 2 layers is valid); converting it to the scanned layout builds a scanned one
        if self.count < 1 or self.block < 1 or (self.scanned and self.count % self.block):
            raise ValueError(f"layer stack {'/'.join(self.path) or '<root>'}: {self.count} layers cannot be "
                             f"scanned in blocks of {self.block}")

    @property
    def steps(self) -> int:
        """Length of the scan (leading axis of the stacked leaves)."""
        return self.count // self.block

    def unrolled_keys(self) -> list[str]:
        return [f"{self.unrolled_prefix}{i}" for i in range(self.count)]

    def scanned_child(self, layer: int) -> tuple[tuple[str, ...], int]:
        """Where unrolled layer ``layer`` lives in the scanned layout: (child path under
        :attr:`path`, index on the stacked axis). The one definition of the correspondence."""
        if self.block == 1:
            return (self.scanned_name,), layer
        return (self.scanned_name, f"sub_{layer % self.block}"), layer // self.block

    def with_prefix(self, prefix: Sequence[str]) -> "LayerStack":
        return dataclasses.replace(self, path=tuple(prefix) + self.path)

    def with_scanned(self, scanned: bool) -> "LayerStack":
        return dataclasses.replace(self, scanned=scanned)


def with_prefix(stacks: Iterable[LayerStack], prefix: Sequence[str]) -> tuple[LayerStack, ...]:
    return tuple(s.with_prefix(prefix) for s in stacks)


def all_unrolled(stacks: Iterable[LayerStack]) -> tuple[LayerStack, ...]:
    """The same stacks asking for the unrolled layout (what the checkpoint rule tables map)."""
    return tuple(s.with_scanned(False) for s in stacks)


# ------------------------------------------------------------------------------ scan


def scan_layers(body: Callable, length: int, *, broadcast_args: int = 0) -> Callable:
    """``nn.scan`` of ``body(module, carry, xs, *broadcast) -> (carry, ys)`` over ``length``
    steps: the module's parameters are stacked on a leading axis named ``layers`` (each step
    its own init and dropout streams); ``xs`` is scanned over its leading axis and the last
    ``broadcast_args`` arguments are the same for every step."""
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(0,) + (nn.broadcast,) * broadcast_args, length=length,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


# ------------------------------------------------------------------------------ leaves


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)


def _stack_spec(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(None, *spec)


def _unstack_spec(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(*tuple(spec)[1:])


def _stacked_sharding(s: Any) -> Any:
    return NamedSharding(s.mesh, _stack_spec(s.spec)) if isinstance(s, NamedSharding) else s


def _unstacked_sharding(s: Any) -> Any:
    return NamedSharding(s.mesh, _unstack_spec(s.spec)) if isinstance(s, NamedSharding) else s


def stack_leaves(leaves: Sequence[Any]) -> Any:
    """One stacked leaf from per-layer leaves: arrays (numpy, jax: placed with the layers'
    sharding plus an unsharded leading axis), ``ShapeDtypeStruct``, ``NamedSharding``,
    ``PartitionSpec``, shape tuples, Flax ``LogicallyPartitioned`` boxes and Orbax metadata
    (anything with ``shape`` and ``dtype``)."""
    first, n = leaves[0], len(leaves)
    if isinstance(first, nn.LogicallyPartitioned):
        return first.replace_boxed(stack_leaves([x.unbox() for x in leaves])).replace(
            names=(LAYERS_AXIS,) + tuple(first.names))
    if isinstance(first, NamedSharding):
        return _stacked_sharding(first)
    if isinstance(first, PartitionSpec):
        return _stack_spec(first)
    if _is_shape(first):
        return (n,) + tuple(first)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((n,) + tuple(first.shape), first.dtype,
                                    sharding=_stacked_sharding(getattr(first, "sharding", None)))
    if isinstance(first, jax.Array):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=_stacked_sharding(sharding))(*leaves)
        return jnp.stack(leaves)
    if isinstance(first, np.ndarray) or np.isscalar(first):
        return np.stack(leaves)
    if hasattr(first, "shape") and hasattr(first, "dtype"):  # e.g. Orbax ArrayMetadata
        return jax.ShapeDtypeStruct((n,) + tuple(first.shape), first.dtype)
    raise TypeError(f"cannot stack layer leaves of type {type(first).__name__}")


def unstack_leaf(leaf: Any, n: int) -> list[Any]:
    """The inverse of :func:`stack_leaves`: ``n`` per-layer leaves."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        names = tuple(leaf.names)[1:]
        return [leaf.replace_boxed(v).replace(names=names) for v in unstack_leaf(leaf.unbox(), n)]
    if isinstance(leaf, NamedSharding):
        return [_unstacked_sharding(leaf)] * n
    if isinstance(leaf, PartitionSpec):
        return [_unstack_spec(leaf)] * n
    if _is_shape(leaf):
        return [tuple(leaf[1:])] * n
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype,
                                     sharding=_unstacked_sharding(getattr(leaf, "sharding", None)))] * n
    if leaf.shape[0] != n:
        raise ValueError(f"stacked leaf of shape {tuple(leaf.shape)} does not hold {n} layers")
    if isinstance(leaf, jax.Array):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            out = _unstacked_sharding(sharding)
            return list(jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=(out,) * n)(leaf))
        return [leaf[i] for i in range(n)]
    if isinstance(leaf, np.ndarray):
        return [leaf[i] for i in range(n)]
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return [jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)] * n
    raise TypeError(f"cannot unstack a leaf of type {type(leaf).__name__}")


# ------------------------------------------------------------------------------ trees


def _is_dict_leaf(x: Any) -> bool:
    return not isinstance(x, Mapping)


def _zip_dicts(trees: Sequence[Mapping], where: str) -> dict:
    """``{k: [t[k] for t in trees]}`` recursively; every tree must have the same keys."""
    keys = set(trees[0])
    for t in trees[1:]:
        if set(t) != keys:
            raise ValueError(f"{where}: the layers do not have the same parameters "
                             f"({sorted(keys ^ set(t))[:4]} differ); they cannot be stacked")
    out = {}
    for k in trees[0]:
        children = [t[k] for t in trees]
        out[k] = _zip_dicts(children, f"{where}/{k}") if isinstance(children[0], Mapping) else stack_leaves(children)
    return out


def _split_dict(tree: Mapping, n: int) -> list[dict]:
    outs: list[dict] = [{} for _ in range(n)]
    for k, v in tree.items():
        parts = _split_dict(v, n) if isinstance(v, Mapping) else unstack_leaf(v, n)
        for o, p in zip(outs, parts):
            o[k] = p
    return outs


def _node_layout(node: Mapping, stack: LayerStack) -> bool | None:
    """True if ``node`` holds the stack scanned, False if unrolled, None if neither."""
    keys = stack.unrolled_keys()
    present = [k for k in keys if k in node]
    if present:
        if len(present) != len(keys):
            missing = sorted(set(keys) - set(present))
            raise ValueError(f"{'/'.join(stack.path) or '<root>'}: layers {missing[:4]} are missing "
                             f"({len(present)} of {len(keys)} present); cannot convert the layer stack")
        return False
    if isinstance(node.get(stack.scanned_name), Mapping):
        return True
    return None


def _children_by_location(stack: LayerStack) -> dict[tuple[str, ...], list[int]]:
    """scanned child path -> the unrolled layers stacked there, in stack order (the list
    position of layer ``i`` is its index from :meth:`LayerStack.scanned_child`)."""
    out: dict[tuple[str, ...], list[int]] = {}
    for i in range(stack.count):
        out.setdefault(stack.scanned_child(i)[0], []).append(i)
    return out


def _stack_node(node: Mapping, stack: LayerStack, where: str) -> dict:
    keys = stack.unrolled_keys()
    out = {k: v for k, v in node.items() if k not in set(keys)}
    for child, layers in _children_by_location(stack).items():
        parent = out
        for name in child[:-1]:
            parent = parent.setdefault(name, {})
        parent[child[-1]] = _zip_dicts([node[keys[i]] for i in layers], "/".join((where,) + child[1:]))
    return out


def _unstack_node(node: Mapping, stack: LayerStack) -> dict:
    out = {k: v for k, v in node.items() if k != stack.scanned_name}
    keys = stack.unrolled_keys()
    for child, layers in _children_by_location(stack).items():
        sub = node
        for name in child:
            sub = sub[name]
        for i, part in zip(layers, _split_dict(sub, len(layers))):
            out[keys[i]] = part
    return out


def scanned_location(path: Sequence[str], stacks: Iterable[LayerStack]) -> tuple[tuple[str, ...], int | None]:
    """A parameter path of the unrolled layout (``("llm", "layers_3", "attn", ...)``, rooted
    like the stacks' paths) -> (its path in the layout the stacks ask for, index on the
    stacked axis or None). Paths outside a scanned stack come back unchanged."""
    path = tuple(path)
    for stack in stacks:
        n = len(stack.path)
        if not stack.scanned or path[:n] != stack.path or len(path) <= n:
            continue
        name = path[n]
        if name.startswith(stack.unrolled_prefix) and name[len(stack.unrolled_prefix):].isdigit():
            layer = int(name[len(stack.unrolled_prefix):])
            if layer < stack.count:
                child, index = stack.scanned_child(layer)
                return stack.path + child + path[n + 1:], index
    return path, None


def _matches(path: tuple[str, ...], stack: LayerStack) -> bool:
    n = len(stack.path)
    return path[len(path) - n:] == stack.path if n else True


def _map_dict_nodes(tree: Any, fn: Callable[[tuple[str, ...], Mapping], Mapping], path: tuple[str, ...] = ()) -> Any:
    """Applies ``fn(path, node)`` to every dict node (top-down), through any pytree
    container (tuples, NamedTuples, Flax structs, optax states); ``path`` holds dict keys."""
    if isinstance(tree, Mapping):
        tree = fn(path, tree)
        return {k: _map_dict_nodes(v, fn, path + (str(k),)) for k, v in tree.items()}
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
    if treedef.num_nodes == 1:  # a leaf (or None)
        return tree
    return jax.tree_util.tree_unflatten(treedef, [_map_dict_nodes(c, fn, path) for c in children])


def to_layout(tree: Any, stacks: Iterable[LayerStack]) -> Any:
    """``tree`` with every layer stack in the layout its :class:`LayerStack` asks for.

    The current layout of each stack is read from the keys (``layers_{i}`` vs ``layers``), so
    the call is idempotent and converts either way. Leaves may be arrays, abstract shapes,
    shardings or metadata (see :func:`stack_leaves`).
    """
    stacks = tuple(stacks)

    def convert(path, node):
        for stack in stacks:
            if not _matches(path, stack):
                continue
            layout = _node_layout(node, stack)
            if layout is None or layout == stack.scanned:
                continue
            where = "/".join(path + (stack.scanned_name,))
            node = _stack_node(node, stack, where) if stack.scanned else _unstack_node(node, stack)
        return node

    return _map_dict_nodes(tree, convert)


def layout_of(tree: Any, stacks: Iterable[LayerStack]) -> tuple[LayerStack, ...]:
    """The stacks with ``scanned`` set to the layout ``tree`` holds them in (stacks the tree
    does not contain keep theirs)."""
    found: dict[int, bool] = {}
    stacks = tuple(stacks)

    def look(path, node):
        for i, stack in enumerate(stacks):
            if i not in found and _matches(path, stack):
                layout = _node_layout(node, stack)
                if layout is not None:
                    found[i] = layout
        return node

    _map_dict_nodes(tree, look)
    return tuple(s.with_scanned(found.get(i, s.scanned)) for i, s in enumerate(stacks))
