"""Pallas splash attention (TPU) for any D²VLM mask, through its *dynamic* mask.

``jax.experimental.pallas.ops.tpu.splash_attention`` is a flash-attention kernel for one
example (``q [H, T, D]``, ``k/v [Hkv, S, D]``, GQA by head groups). Its static masks and
segment ids cannot express the D²VLM masks (a bidirectional frame block at a per-example
offset; response branches that all see the shared prefix but not each other), so every call
here builds the example's boolean mask ``[T, S]`` from the :class:`AttentionMask`
description and hands it to the kernel as a dynamic mask: the kernel reads a
``[T/bq, S/bkv]`` block map from it and skips every all-masked block (the upper causal
triangle, the other branches), applying the mask elementwise only in mixed blocks. The
choice against cascade attention (prefix part + own-branch part merged by their
log-sum-exp) is measured in ``docs/ARCHITECTURE.md`` ("Attention kernels").

* Sharding: under a mesh the kernel runs in ``shard_map`` with the batch split over the
  mesh axes of the leading dim and heads over those of ``act_heads`` (each device builds the
  masks of its own examples; nothing is replicated); the sequence axes are not split.
* Lengths: T and S are padded to multiples of 128 (added keys masked, added query rows see
  key 0; their outputs are dropped); blocks are the largest of 512 / 256 / 128 dividing them.
* Scale: the kernel does not scale q; it is multiplied by ``D ** -0.5`` here.
* Off TPU (tests on CPU) the kernel runs in Pallas interpret mode: slow, same numerics.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.sharding import PartitionSpec

from d2vlm_jax import sharding
from d2vlm_jax.models import attention
from d2vlm_jax.models.kernels.padding import pad_to_multiple

LANE = 128                     # TPU lane width: kernel lengths are multiples of it
BLOCK_SIZES = (512, 256, 128)  # candidate q / kv block sizes, largest first


def block_size(length: int) -> int:
    """The largest candidate block dividing ``length`` (a multiple of 128)."""
    return next(b for b in BLOCK_SIZES if length % b == 0)


def _kernel_for(mask: jax.Array, interpret: bool) -> splash_kernel.SplashAttentionKernel:
    """Splash kernel of one example's dynamic mask bool[T, S] (shared by all heads)."""
    t, s = mask.shape
    bq, bkv = block_size(t), block_size(s)
    blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                      block_q_dq=bq, block_kv_dq=bkv)
    kernel = splash_kernel.make_splash_mha(mask[None], block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                           interpret=interpret)
    # make_splash_mha turns every MaskInfo field into an array, the flag `is_dynamic_mask`
    # included, and the kernel branches on it in Python: under jit that is a traced bool.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        info = getattr(kernel, name)
        if info is not None:
            setattr(kernel, name, info._replace(is_dynamic_mask=True))
    return kernel


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, *, interpret: bool) -> jax.Array:
    """The kernel over the examples of one shard. q float[b, T, h, D]; k, v float[b, S, hkv, D];
    mask: AttentionMask / bool[b or 1, T, S] / None -> float[b, T, h, D]."""
    b, t, _, d = q.shape
    s = k.shape[1]
    dense = jnp.broadcast_to(attention.dense_mask(mask, t, s), (b, t, s))
    q, k, v, dense = pad_to_multiple(q, k, v, dense, LANE)
    scale = jnp.asarray(d ** -0.5, jnp.float32)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)   # [b, h, T', D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                    # [b, hkv, S', D]
    out = jax.vmap(lambda q1, k1, v1, m1: _kernel_for(m1, interpret)(q1, k1, v1))(qh, kh, vh, dense)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _specs(q: jax.Array, k: jax.Array, mask: Any, rules: Sequence[tuple[str, Any]], batch_axis: str,
           mesh_shape: dict[str, int]):
    """shard_map specs: batch over ``batch_axis``'s mesh axes, heads over ``act_heads``'s
    when both q's and k's head counts divide (else heads stay whole)."""
    q_spec = sharding.logical_to_spec((batch_axis, None, "act_heads", None), rules, q.shape, mesh_shape)
    k_spec = sharding.logical_to_spec((batch_axis, None, "act_heads", None), rules, k.shape, mesh_shape)
    q_spec = tuple(q_spec) + (None,) * (4 - len(q_spec))
    k_spec = tuple(k_spec) + (None,) * (4 - len(k_spec))
    batch = q_spec[0] if q_spec[0] == k_spec[0] else None
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    qkv_spec = PartitionSpec(batch, None, heads, None)
    if mask is None:
        mask_spec = None
    elif isinstance(mask, attention.AttentionMask):
        per_slot = PartitionSpec(batch, None)
        mask_spec = attention.AttentionMask(attention.SequenceLayout(per_slot, per_slot, per_slot), PartitionSpec())
    else:
        mask_spec = PartitionSpec(batch if mask.shape[0] > 1 else None, None, None)
    return qkv_spec, mask_spec


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, *,
                     rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
                     batch_axis: str = "batch", interpret: bool | None = None) -> jax.Array:
    """Splash attention with the mask of ``mask`` (see module docstring).

    Args:
      q: float[B, T, Hq, D]; k, v: float[B, S, Hkv, D].
      mask: :class:`~d2vlm_jax.models.attention.AttentionMask`, bool[B or 1, T, S], or None.
      interpret: Pallas interpret mode (default: off TPU only).
    Returns:
      float[B, T, Hq, D] in q's dtype.
    """
    if interpret is None:
        interpret = attention.platform() != "tpu"
    if isinstance(mask, attention.AttentionMask):
        mask = attention.AttentionMask(mask.layout, jnp.asarray(mask.query_start, jnp.int32))
    elif mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)
    body = functools.partial(_local_attention, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return body(q, k, v, mask)
    qkv_spec, mask_spec = _specs(q, k, mask, rules, batch_axis, dict(mesh.shape))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, mask_spec),
                           out_specs=qkv_spec, check_vma=False)
    return mapped(q, k, v, mask)
