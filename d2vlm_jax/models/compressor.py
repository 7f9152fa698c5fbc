"""Frame compressor: 32 Q-Former query states + 256 patch features -> 1 LLM token (SPEC §1.3).

With ``Q`` the query states of a frame and ``X`` its patch features *before* ``ln_vision``::

  Qo = proj(Q)                                   # Linear 768 -> 1408 (authors: qformer_proj)
  q  = q_proj(Qo) = Linear(LayerNorm(Qo))        # 1408 -> 1408 (qformer_q_proj.{0,1})
  k  = k_proj(X)  = Linear(LayerNorm(X))         # 1408 -> 1408 (qformer_k_proj.{0,1})
  A  = softmax(q kᵀ / sqrt(1408))                # [32, 256]; X itself is the value (no v proj
                                                 #  on X, as in the authors' code)
  z  = mean over the 32 rows of (A X + Qo)       # 1408
  frame_token = v_proj(z) = Linear(LayerNorm(z)) # 1408 -> d_llm (qformer_v_proj.{0,1})

All Linear layers have a bias; LayerNorms use PyTorch's default eps 1e-5 (the authors build
them as ``nn.LayerNorm(1408)``). Parameter tree: ``proj``, ``{q,k,v}_proj/{norm, linear}``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax.models.layers import Dense, LayerNorm, dtype_from_name


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Attributes:
      query_dim: Q-Former hidden size (768).
      vision_dim: patch feature size (1408).
      out_dim: LLM hidden size ``d_llm`` (3072 for Phi-3-Mini).
      layer_norm_eps: epsilon of the three LayerNorms (1e-5).
      dtype / param_dtype: computation / parameter dtype names.
    """
    query_dim: int = 768
    vision_dim: int = 1408
    out_dim: int = 3072
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"


class NormLinear(nn.Module):
    """``Linear(LayerNorm(x))`` — the authors' ``nn.Sequential(LayerNorm, Linear)``."""
    features: int
    eps: float
    axes: tuple
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., Din] -> float[..., features]."""
        dtype, param_dtype = dtype_from_name(self.dtype), dtype_from_name(self.param_dtype)
        x = LayerNorm(self.eps, dtype=dtype, param_dtype=param_dtype, name="norm")(x)
        return Dense(self.features, self.axes, dtype=dtype, param_dtype=param_dtype, name="linear")(x)


class FrameCompressor(nn.Module):
    """One token per frame from its query states and patch features."""
    config: CompressorConfig

    @nn.compact
    def __call__(self, query_states: jax.Array, patches: jax.Array) -> jax.Array:
        """Args:
          query_states: float[F, Q, query_dim] Q-Former outputs.
          patches: float[F, P, vision_dim] patch features before ``ln_vision``.

        Returns:
          float[F, out_dim] one token per frame.
        """
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        d = cfg.vision_dim
        qo = Dense(d, (None, "embed"), dtype=dtype, param_dtype=param_dtype, name="proj")(query_states)
        q = NormLinear(d, cfg.layer_norm_eps, (None, "embed"), cfg.dtype, cfg.param_dtype, name="q_proj")(qo)
        k = NormLinear(d, cfg.layer_norm_eps, (None, "embed"), cfg.dtype, cfg.param_dtype, name="k_proj")(patches)
        scores = jnp.einsum("fqd,fpd->fqp", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
        attn = jax.nn.softmax(scores, axis=-1).astype(dtype)
        mixed = jnp.einsum("fqp,fpd->fqd", attn, patches.astype(dtype))
        z = jnp.mean((mixed + qo).astype(jnp.float32), axis=1).astype(dtype)
        return NormLinear(cfg.out_dim, cfg.layer_norm_eps, (None, "embed"), cfg.dtype, cfg.param_dtype,
                          name="v_proj")(z)
