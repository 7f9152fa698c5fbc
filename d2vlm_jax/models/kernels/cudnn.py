"""cuDNN flash attention (GPU) through ``jax.nn.dot_product_attention(implementation="cudnn")``.

NOT YET RUN ON A GPU: this path is checked on CPU only, by running the very call it makes
with ``implementation="xla"`` (same bias, same GQA layout) against the project's XLA
attention (``tests/test_attention_kernels.py``). ``benchmarks/gpu_step.py`` is the first
program to run it on a CUDA device.

What cuDNN takes (jax v0.10.2, ``jax/_src/cudnn/fused_attention_stablehlo.py``):

* dtypes fp16 / bf16 only (fp8 without masks); q, k, v in ``[B, T, H, D]``, GQA by head
  groups; head dim a multiple of 8, <= 128 (<= 256 from Hopper on): Phi-3's 96 fits;
* masks: causal / padding by sequence lengths / sliding window natively (no mask tensor), or
  an arbitrary mask as an additive bias ``[B or 1, H or 1, T, S]``. The D²VLM masks (frame
  block, branches, padding holes) need the bias: this module builds it once per call,
  ``0`` where allowed and ``-0.7 * finfo.max`` elsewhere, in the compute dtype, with one
  head (broadcast). With a bias cuDNN computes every block (no sparsity skipping) and,
  in training, needs even T and S (padded here).

Cost: the bias ``[B, 1, T, S]`` (bf16: 8 MiB per example at T = S = 2048) is read by the
forward and backward kernels; no f32 score tensor is materialized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from d2vlm_jax.models.kernels.padding import pad_to_multiple

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def mask_to_bias(mask: jax.Array, dtype) -> jax.Array:
    """bool[B, T, S] -> additive bias ``dtype[B, 1, T, S]``: 0 allowed, large negative not."""
    large_negative = jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)
    return jnp.where(mask, jnp.asarray(0, dtype), large_negative)[:, None]


def cudnn_call_arguments(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
    """The ``(q, k, v, bias, T)`` that go to ``jax.nn.dot_product_attention``: T and S
    padded to even lengths, the mask as a bias (shared with the CPU equivalence test)."""
    t = q.shape[1]
    q, k, v, mask = pad_to_multiple(q, k, v, jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:]), 2)
    return q, k, v, mask_to_bias(mask, q.dtype), t


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    implementation: str = "cudnn") -> jax.Array:
    """q float[B, T, Hq, D]; k, v float[B, S, Hkv, D]; mask bool[B or 1, T, S] -> float[B, T, Hq, D].

    ``implementation="xla"`` runs the identical call through XLA (the CPU check).
    """
    if implementation == "cudnn" and q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention implementation 'cudnn' needs bfloat16 or float16 activations, got {q.dtype}: "
                         f"set the model's dtype (e.g. model.llm.dtype='bfloat16') or use 'xla'")
    if q.shape[-1] % 8:
        raise ValueError(f"attention implementation 'cudnn' needs a head dim that is a multiple of 8, got {q.shape[-1]}")
    q, k, v, bias, t = cudnn_call_arguments(q, k, v, mask)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
    return out[:, :t]
