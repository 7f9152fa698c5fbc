"""Instruction-aware Q-Former (InstructBLIP style), run once per frame (SPEC §1.2).

BERT-base post-LN layers over ``[queries; text]``: self-attention over the whole sequence
(text padding masked as keys), on layers ``0, f, 2f, ...`` (``f`` =
``cross_attention_frequency``) a cross-attention from the **query positions only** to the
frame's patch features, then separate FFNs for the query part and the text part. Output: the
query states of the last layer.

This module also owns the two non-BERT pieces that feed it: the learned ``query_tokens`` and
``ln_vision`` (the LayerNorm over the 1408-d patch features, applied only to the
cross-attention input; the frame compressor uses the features *before* it). In the authors'
checkpoint they are ``model.qformer_query`` and ``model.qformer_ln``; in HF InstructBLIP
``query_tokens`` and ``vision_model.post_layernorm``.

Parameter tree::

  query_tokens [Q, H]                     ln_vision/{scale, bias}
  embeddings/{word_embeddings [V, H], position_embeddings [P, H], layernorm/{scale, bias}}
  layers_{i}/self_attn/{query, key, value, out}/{kernel, bias}, self_attn/norm
  layers_{i}/cross_attn/...              (only layers with cross-attention; key/value
                                          kernels are [encoder_width, H])
  layers_{i}/ffn_query/{intermediate, output}/{kernel, bias}, ffn_query/norm
  layers_{i}/ffn_text/...                 (same shapes)

With ``scan_layers`` the layers run as one ``nn.scan`` over blocks of
``cross_attention_frequency`` layers (the cross-attention layer first; 6 blocks of 2 for
BERT-base): ``layers/sub_{j}/...`` holds layers ``j, j + f, j + 2f, ...`` stacked on a leading
axis (``d2vlm_jax.models.stacking`` converts between the layouts).

Dropout (0.1 in BERT's config) is not implemented: the module is deterministic.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import stacking
from d2vlm_jax.models.layers import Dense, LayerNorm, dtype_from_name, remat_layer
from d2vlm_jax.models.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Q-Former hyper-parameters (defaults: BERT-base Q-Former of SPEC §1.2).

    Attributes:
      hidden_size: BERT hidden size (768).
      num_layers: BERT layers (12).
      num_heads: attention heads (12).
      intermediate_size: FFN hidden size (3072).
      layer_norm_eps: BERT LayerNorm epsilon (1e-12).
      vocab_size: WordPiece vocabulary (30522 + ``[DEC]`` = 30523).
      max_position_embeddings: text positions (512).
      num_queries: learned query tokens (32).
      cross_attention_frequency: cross-attention on layers ``i % freq == 0`` (2).
      encoder_width: patch feature size (1408).
      ln_vision_eps: epsilon of ``ln_vision`` (1e-5: the authors' ``nn.LayerNorm`` default).
      dtype / param_dtype: computation / parameter dtype names.
      remat_policy: ``layers.remat_policy`` name applied per layer (None = no remat).
      scan_layers: scan blocks of ``cross_attention_frequency`` layers (needs ``num_layers``
        to be a multiple of it) instead of unrolling ``layers_{i}``; same results.
    """
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    num_queries: int = 32
    cross_attention_frequency: int = 2
    encoder_width: int = 1408
    ln_vision_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str | None = None
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.scan_layers and self.num_layers % self.cross_attention_frequency:
            raise ValueError(f"scan_layers scans blocks of cross_attention_frequency={self.cross_attention_frequency} "
                             f"layers: num_layers={self.num_layers} is not a multiple of it")

    @property
    def layer_stack(self) -> stacking.LayerStack:
        """Where the layers sit in the Q-Former's parameter tree, and in which layout."""
        return stacking.LayerStack((), "layers_", "layers", self.num_layers, self.cross_attention_frequency,
                                   self.scan_layers)

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


class QFormerAttention(nn.Module):
    """BERT attention sub-layer: ``norm(x + out(attn(query(x), key(kv), value(kv))))``."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Args: x float[F, T, H]; kv float[F, S, Dkv]; mask bool[F, 1, S] (key validity) or None.

        Returns float[F, T, H].
        """
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        h, nh = cfg.hidden_size, cfg.num_heads
        dense = lambda name, axes: Dense(h, axes, dtype=dtype, param_dtype=param_dtype, name=name)
        f, t, _ = x.shape
        s = kv.shape[1]
        q = dense("query", ("embed", "heads"))(x).reshape(f, t, nh, h // nh)
        k = dense("key", ("embed", "heads"))(kv).reshape(f, s, nh, h // nh)
        v = dense("value", ("embed", "heads"))(kv).reshape(f, s, nh, h // nh)
        if mask is None:
            mask = jnp.ones((1, 1, s), bool)
        mask = jnp.broadcast_to(mask, (mask.shape[0], t, s))
        out = dense("out", ("heads", "embed"))(dot_product_attention(q, k, v, mask).reshape(f, t, h))
        return LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(out + x)


class QFormerFFN(nn.Module):
    """BERT FFN sub-layer: ``norm(x + output(gelu(intermediate(x))))`` (exact GELU)."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[F, T, H] -> float[F, T, H]."""
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        y = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                  name="intermediate")(x)
        y = jax.nn.gelu(y, approximate=False)
        y = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, name="output")(y)
        return LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(y + x)


class QFormerLayer(nn.Module):
    """One Q-Former layer (self-attn, optional query->image cross-attn, split FFNs)."""
    config: QFormerConfig
    has_cross_attention: bool
    rules: tuple = sharding.DEFAULT_RULES

    @nn.compact
    def __call__(self, x: jax.Array, self_mask: jax.Array, image: jax.Array) -> jax.Array:
        """Args:
          x: float[F, Q + L, H] hidden states, queries first.
          self_mask: bool[F, 1, Q + L] key validity.
          image: float[F, P, encoder_width] patch features after ``ln_vision``.

        Returns float[F, Q + L, H].
        """
        cfg = self.config
        nq = cfg.num_queries
        x = QFormerAttention(cfg, name="self_attn")(x, x, self_mask)
        queries, text = x[:, :nq], x[:, nq:]
        if self.has_cross_attention:
            queries = QFormerAttention(cfg, name="cross_attn")(queries, image, None)
        queries = QFormerFFN(cfg, name="ffn_query")(queries)
        text = QFormerFFN(cfg, name="ffn_text")(text)  # also for L = 0: the tree stays the same
        x = jnp.concatenate([queries, text], axis=1)
        return sharding.constrain(x, ("frames", None, "act_embed"), self.rules)


class QFormerBlock(nn.Module):
    """``cross_attention_frequency`` consecutive layers (``sub_{j}``; ``sub_0`` has the
    cross-attention): the step of the scanned Q-Former."""
    config: QFormerConfig
    rules: tuple = sharding.DEFAULT_RULES

    @nn.compact
    def __call__(self, x: jax.Array, self_mask: jax.Array, image: jax.Array) -> jax.Array:
        """Same arguments and result as :class:`QFormerLayer`."""
        cfg = self.config
        layer_cls = remat_layer(QFormerLayer, cfg.remat_policy, scanned=True)
        for j in range(cfg.cross_attention_frequency):
            x = layer_cls(cfg, cfg.has_cross_attention(j), self.rules, name=f"sub_{j}")(x, self_mask, image)
        return x


class QFormer(nn.Module):
    """Q-Former with its query tokens and ``ln_vision``; one sequence per frame."""
    config: QFormerConfig
    rules: tuple = sharding.DEFAULT_RULES

    @nn.compact
    def __call__(self, image_features: jax.Array, text_ids: jax.Array, text_valid: jax.Array) -> jax.Array:
        """Query states of the last layer.

        Args:
          image_features: float[F, P, encoder_width] patch features of each frame, *before*
            ``ln_vision`` (applied here).
          text_ids: int32[F, L] WordPiece ids of the instruction (one row per frame).
          text_valid: bool[F, L] False at padding. Text positions are counted over valid
            tokens (``cumsum(valid) - 1``), so right padding gives HF's ``0..L-1`` and left
            padding gives the same result as no padding.

        Returns:
          float[F, num_queries, hidden_size].
        """
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        f = image_features.shape[0]
        image = LayerNorm(cfg.ln_vision_eps, dtype=dtype, param_dtype=param_dtype,
                          name="ln_vision")(image_features)
        image = sharding.constrain(image, ("frames", None, "act_embed"), self.rules)

        query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("queries", "embed")),
            (cfg.num_queries, cfg.hidden_size), param_dtype)
        queries = jnp.broadcast_to(query_tokens.astype(dtype), (f, cfg.num_queries, cfg.hidden_size))
        x = QFormerEmbeddings(cfg, name="embeddings")(queries, text_ids, text_valid)
        x = sharding.constrain(x, ("frames", None, "act_embed"), self.rules)

        key_valid = jnp.concatenate([jnp.ones((f, cfg.num_queries), bool), text_valid.astype(bool)], axis=1)
        self_mask = key_valid[:, None, :]
        if cfg.scan_layers:
            run = stacking.scan_layers(lambda block, x, _, mask, image: (block(x, mask, image), None),
                                       cfg.num_layers // cfg.cross_attention_frequency, broadcast_args=2)
            x, _ = run(QFormerBlock(cfg, self.rules, name="layers"), x, None, self_mask, image)
        else:
            layer_cls = remat_layer(QFormerLayer, cfg.remat_policy, scanned=False)
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, cfg.has_cross_attention(i), self.rules, name=f"layers_{i}")(x, self_mask, image)
        return x[:, :cfg.num_queries]


class QFormerEmbeddings(nn.Module):
    """``LayerNorm([queries; word + position embeddings of the text])``."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, queries: jax.Array, ids: jax.Array, valid: jax.Array) -> jax.Array:
        """float[F, Q, H], int32[F, L], bool[F, L] -> float[F, Q + L, H]."""
        cfg = self.config
        dtype, param_dtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        init = nn.initializers.normal(0.02)
        word = self.param("word_embeddings", nn.with_logical_partitioning(init, ("vocab", "embed")),
                          (cfg.vocab_size, cfg.hidden_size), param_dtype)
        pos = self.param("position_embeddings", nn.with_logical_partitioning(init, ("positions", "embed")),
                         (cfg.max_position_embeddings, cfg.hidden_size), param_dtype)
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        text = (jnp.take(word, ids, axis=0) + jnp.take(pos, positions, axis=0)).astype(dtype)
        x = jnp.concatenate([queries.astype(dtype), text], axis=1)
        return LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="layernorm")(x)
