"""LoRA adapters as parameter-tree operations.

A LoRA-wrapped projection (``LoRADense``) is a sub-tree ``{base: {kernel, [bias]},
lora_a: [in, r], lora_b: [r, out]}``; its effective kernel is
``base.kernel + scale * lora_a @ lora_b`` with ``scale = alpha / r``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

LORA_LEAVES = ("lora_a", "lora_b")


def _is_lora_node(node: Any) -> bool:
    return isinstance(node, Mapping) and "lora_a" in node and "lora_b" in node and "base" in node


def _map_lora_nodes(tree: Any, fn) -> Any:
    if _is_lora_node(tree):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: _map_lora_nodes(v, fn) for k, v in tree.items()}
    return tree


def merge_lora(params: Mapping, alpha: float, rank: int) -> dict:
    """Folds every adapter into its base kernel and zeroes ``lora_b`` (same tree structure)."""
    scale = alpha / rank

    def merge(node):
        a, b = node["lora_a"], node["lora_b"]
        base = dict(node["base"])
        base["kernel"] = (base["kernel"].astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
                          ).astype(base["kernel"].dtype)
        return {**node, "base": base, "lora_b": jnp.zeros_like(b)}

    return _map_lora_nodes(params, merge)


def disable_lora(params: Mapping) -> dict:
    """The same parameters with every adapter switched off (``lora_b = 0``)."""
    return _map_lora_nodes(params, lambda node: {**node, "lora_b": jnp.zeros_like(node["lora_b"])})


def strip_lora(tree: Mapping) -> dict:
    """The tree without adapter leaves (e.g. the target of a base-checkpoint load)."""
    return _map_lora_nodes(tree, lambda node: {k: v for k, v in node.items() if k not in LORA_LEAVES})


def graft(base_tree: Mapping, full_tree: Mapping) -> dict:
    """``full_tree`` with every leaf present in ``base_tree`` replaced by it."""
    out = {}
    for k, v in full_tree.items():
        if k in base_tree:
            out[k] = graft(base_tree[k], v) if isinstance(v, Mapping) else base_tree[k]
        else:
            out[k] = v
    return out


def count_lora_params(params: Mapping) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if any(getattr(p, "key", None) in LORA_LEAVES for p in path):
            total += leaf.size
    return total
