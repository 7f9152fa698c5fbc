"""Attention masks from a *description*, and the one attention function.

The mask is never an input of the model: the model gets per-slot attributes of the
sequence (the :class:`SequenceLayout`) and builds the mask it needs. Slots are positions in
the (possibly cached) key sequence; queries are a contiguous run of slots starting at
``query_start``.

For query slot ``i`` and key slot ``j`` attention is allowed iff ``valid[j]`` and either

* ``j <= i`` and (``branch[j] == 0`` or ``branch[j] == branch[i]``)   (causal, branch-aware), or
* ``block[j] != 0`` and ``block[j] == block[i]``                       (bidirectional block).

``branch`` 0 is the shared prefix; packed preference pairs put the chosen response in
branch 1 and rejected responses in branches 2, 3, ... so a rejected token sees the prefix
and its own branch only (SPEC §4.2). ``block`` marks the frame tokens, which attend to each
other in both directions (SPEC §1.4). Position ids are separate explicit inputs.

The kernel behind :func:`dot_product_attention` can change (cuDNN, splash attention)
without touching the model: it receives q, k, v and the boolean mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a fully masked (padding) query row stays finite


class SequenceLayout(NamedTuple):
    """Per-slot attributes of the key sequence, all ``[B, S]``.

    valid:  bool   slot holds a real token (False = padding / empty cache slot)
    branch: int32  0 = shared prefix, 1.. = response branches (mutually invisible)
    block:  int32  0 = none, else id of a bidirectional block (frame tokens)
    """
    valid: jax.Array
    branch: jax.Array
    block: jax.Array

    @staticmethod
    def causal(valid: jax.Array) -> "SequenceLayout":
        zeros = jnp.zeros(valid.shape, jnp.int32)
        return SequenceLayout(valid.astype(bool), zeros, zeros)


def positions_from_valid(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids ``offset + (number of valid slots before this one)``: int32[B, T].

    ``offset`` is a scalar or int32[B] (e.g. the number of valid prefix tokens, where a
    response branch restarts its positions).
    """
    valid = valid.astype(jnp.int32)
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 1:
        offset = offset[:, None]
    return jnp.cumsum(valid, axis=-1) - valid + offset


def build_mask(layout: SequenceLayout, query_start: jax.Array | int, num_queries: int) -> jax.Array:
    """bool[B, T, S] attention mask for queries at slots ``[query_start, query_start + T)``."""
    num_slots = layout.valid.shape[1]
    q_slots = jnp.asarray(query_start, jnp.int32) + jnp.arange(num_queries, dtype=jnp.int32)
    k_slots = jnp.arange(num_slots, dtype=jnp.int32)
    q_branch = jax.lax.dynamic_slice_in_dim(layout.branch, query_start, num_queries, axis=1)
    q_block = jax.lax.dynamic_slice_in_dim(layout.block, query_start, num_queries, axis=1)
    k_branch = layout.branch[:, None, :]
    k_block = layout.block[:, None, :]
    causal = (k_slots[None, :] <= q_slots[:, None])[None]
    same_branch = (k_branch == 0) | (k_branch == q_branch[:, :, None])
    bidirectional = (k_block != 0) & (k_block == q_block[:, :, None])
    return ((causal & same_branch) | bidirectional) & layout.valid[:, None, :].astype(bool)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str = "xla") -> jax.Array:
    """Grouped-query attention.

    Args:
      q: float[B, T, Hq, D]; k, v: float[B, S, Hkv, D] with ``Hq % Hkv == 0``.
      mask: bool[B, T, S].
      implementation: ``"xla"`` (einsum, any backend) or ``"cudnn"`` (GPU fused kernel
        through ``jax.nn.dot_product_attention``).
    Returns:
      float[B, T, Hq, D] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r} (use 'xla' or 'cudnn')")
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)
