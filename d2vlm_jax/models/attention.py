"""Attention masks from a *description*, and the one attention function.

The mask is never an input of the model: the model gets per-slot attributes of the
sequence (the :class:`SequenceLayout`) and builds the mask it needs. Slots are positions in
the (possibly cached) key sequence; queries are a contiguous run of slots starting at
``query_start``.

For query slot ``i`` and key slot ``j`` attention is allowed iff ``valid[j]`` and either

* ``j <= i`` and (``branch[j] == 0`` or ``branch[j] == branch[i]``)   (causal, branch-aware), or
* ``block[j] != 0`` and ``block[j] == block[i]``                       (bidirectional block).

A query slot that is not ``valid`` (padding) attends to its own slot only, so no query row
is ever fully masked (a fully masked row is a NaN in flash kernels) and padding never mixes
with real tokens; real tokens never see padding.

``branch`` 0 is the shared prefix; packed preference pairs put the chosen response in
branch 1 and rejected responses in branches 2, 3, ... so a rejected token sees the prefix
and its own branch only (SPEC §4.2). ``block`` marks the frame tokens, which attend to each
other in both directions (SPEC §1.4). Position ids are separate explicit inputs.

:func:`dot_product_attention` takes q, k, v and either the description
(:class:`AttentionMask`) or a plain boolean mask, and runs one of the implementations in
:data:`IMPLEMENTATIONS`; the model never changes when the kernel does (``docs/ARCHITECTURE.md``,
"Attention kernels").
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from d2vlm_jax import sharding

NEG_INF = -1e30  # finite: masked scores never produce NaN in the XLA path

IMPLEMENTATIONS = ("xla", "splash", "cudnn", "auto")
# Shortest query run a kernel is used for; shorter runs (decoding steps: T = 1) use XLA.
MIN_KERNEL_QUERIES = 2


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


class AttentionMask(NamedTuple):
    """The mask of the queries at slots ``[query_start, query_start + T)`` over all ``S``
    slots of ``layout``, as a description (nothing ``[B, T, S]`` is materialized until an
    implementation asks for it). ``query_start``: int scalar (may be traced)."""
    layout: SequenceLayout
    query_start: Any = 0

    def dense(self, num_queries: int) -> jax.Array:
        """bool[B, T, S]."""
        return build_mask(self.layout, self.query_start, num_queries)


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
    q_valid = jax.lax.dynamic_slice_in_dim(layout.valid.astype(bool), query_start, num_queries, axis=1)
    k_branch = layout.branch[:, None, :]
    k_block = layout.block[:, None, :]
    causal = (k_slots[None, :] <= q_slots[:, None])[None]
    same_branch = (k_branch == 0) | (k_branch == q_branch[:, :, None])
    bidirectional = (k_block != 0) & (k_block == q_block[:, :, None])
    allowed = ((causal & same_branch) | bidirectional) & layout.valid[:, None, :].astype(bool)
    itself = (k_slots[None, :] == q_slots[:, None])[None]
    return jnp.where(q_valid[:, :, None], allowed, itself)


def platform() -> str:
    """The platform the program being traced runs on: the devices of the mesh in context
    (compile-only TPU devices in ``compile_check`` included), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return str(device.platform)
    return jax.default_backend()


def resolve_implementation(implementation: str, q: jax.Array, k: jax.Array) -> str:
    """The implementation that runs: ``"auto"`` is ``splash`` on TPU, ``cudnn`` on GPU for
    bf16/fp16 with a head dim that is a multiple of 8 (<= 128), else ``xla``; a query run
    shorter than :data:`MIN_KERNEL_QUERIES` (a decoding step) always runs ``xla``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if q.shape[1] < MIN_KERNEL_QUERIES:
        return "xla"
    if implementation != "auto":
        return implementation
    plat = platform()
    if plat == "tpu":
        return "splash"
    if plat in ("gpu", "cuda") and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 \
            and q.shape[-1] <= 128:
        return "cudnn"
    return "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA einsum attention with f32 scores. q float[B, T, Hq, D]; k, v float[B, S, Hkv, D];
    mask bool[B or 1, T, S] -> float[B, T, Hq, D]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


def dense_mask(mask: AttentionMask | jax.Array | None, num_queries: int, num_keys: int) -> jax.Array:
    """bool[B or 1, T, S] from a description, a boolean mask, or ``None`` (everything)."""
    if mask is None:
        return jnp.ones((1, num_queries, num_keys), bool)
    if isinstance(mask, AttentionMask):
        return mask.dense(num_queries)
    mask = jnp.asarray(mask, bool)
    return jnp.broadcast_to(mask, mask.shape[:1] + (num_queries, num_keys))


_logged: set = set()


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | jax.Array | None,
                          implementation: str = "xla", *,
                          rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
                          batch_axis: str = "batch") -> jax.Array:
    """Grouped-query attention.

    Args:
      q: float[B, T, Hq, D]; k, v: float[B, S, Hkv, D] with ``Hq % Hkv == 0``.
      mask: an :class:`AttentionMask` (description), a bool mask broadcastable to
        ``[B, T, S]`` (leading dim B or 1), or ``None`` (every query sees every key).
      implementation: ``"xla"`` (einsum, any backend), ``"splash"`` (Pallas TPU splash
        attention; interpret mode off TPU), ``"cudnn"`` (cuDNN flash attention through
        ``jax.nn.dot_product_attention``; bf16/fp16 only) or ``"auto"`` (see
        :func:`resolve_implementation`).
      rules: logical-axis rules; the kernels are ``shard_map``-ped over the mesh axes of
        ``batch_axis`` (leading dim) and ``act_heads``.
      batch_axis: logical name of the leading dim (``"batch"``, or ``"frames"`` in the
        video encoder).
    Returns:
      float[B, T, Hq, D] in q's dtype.
    """
    impl = resolve_implementation(implementation, q, k)
    key = (implementation, impl, q.shape[1:], k.shape[1])
    if key not in _logged:
        _logged.add(key)
        logging.info("attention: %s -> %s for q %s, %d keys", implementation, impl, q.shape, k.shape[1])
    if impl == "xla":
        return xla_attention(q, k, v, dense_mask(mask, q.shape[1], k.shape[1]))
    from d2vlm_jax.models.kernels import cudnn, splash  # the kernels build masks with this module
    if impl == "splash":
        return splash.splash_attention(q, k, v, mask, rules=rules, batch_axis=batch_axis)
    return cudnn.cudnn_attention(q, k, v, dense_mask(mask, q.shape[1], k.shape[1]))
