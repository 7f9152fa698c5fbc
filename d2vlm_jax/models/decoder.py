"""Decoder-only language model: Phi-3, Llama and Qwen2 families by config (SPEC §1.4).

One Linen module, ``Decoder``, serves training and decoding:

* inputs are token ids **or** input embeddings, explicit position ids, and a
  :class:`~d2vlm_jax.models.attention.SequenceLayout` describing the mask;
* an optional :class:`KVCache` (static size ``S``): the call writes its keys/values at slots
  ``[query_start, query_start + T)`` and attends over all ``S`` slots. Training runs the
  prefix once, then the response against the prefix cache (SPEC §3.2); decoding does the
  same one token at a time;
* it returns logits, the requested intermediate hidden states (HF numbering: 0 = embedding
  output, ``i`` = output of decoder layer ``i``) and the updated cache.

Family differences: Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``; Qwen2 has q/k/v biases;
all three use RMSNorm, RoPE (rotate-half convention) and SwiGLU. GQA by ``num_kv_heads``.
LoRA adapters sit on the attention projections (``LoRADense``); rank 0 disables them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models.layers import Dense, LoRADense, RMSNorm, dtype_from_name, remat_policy

FAMILIES = ("phi3", "llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and numerics of the decoder. Hashable (used as a static jit argument)."""
    family: str = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    lora_rank: int = 0
    lora_alpha: float = 256.0
    lora_dropout: float = 0.0
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # master weights
    remat_policy: str = "none"
    attention_impl: str = "xla"   # attention.IMPLEMENTATIONS: xla | splash | cudnn | auto
    sharding_rules: tuple = sharding.DEFAULT_RULES

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"decoder.family must be one of {FAMILIES}, got {self.family!r}")
        if self.attention_impl not in attn_lib.IMPLEMENTATIONS:
            raise ValueError(f"decoder.attention_impl must be one of {attn_lib.IMPLEMENTATIONS}, "
                             f"got {self.attention_impl!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"decoder.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def fused_projections(self) -> bool:
        return self.family == "phi3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.fused_projections else ("q_proj", "k_proj", "v_proj", "o_proj")

    @classmethod
    def from_dict(cls, d: Any) -> "DecoderConfig":
        d = dict(d)
        if "sharding_rules" in d:
            d["sharding_rules"] = sharding.rules_from_config(d["sharding_rules"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"decoder config: unknown fields {sorted(unknown)}")
        return cls(**d)


class KVCache(NamedTuple):
    """Keys and values per layer: tuples of L arrays float[B, S, Hkv, D].

    Per-layer buffers (not one stacked [L, ...] array) let XLA update each layer's slots in
    place, e.g. inside the decoding ``while_loop``, instead of re-stacking the whole cache.
    """
    k: tuple
    v: tuple

    @staticmethod
    def zeros(config: DecoderConfig, batch: int, num_slots: int, dtype=None) -> "KVCache":
        shape = (batch, num_slots, config.num_kv_heads, config.dim_per_head)
        dtype = dtype or dtype_from_name(config.dtype)
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[1]

    def pad_to(self, num_slots: int) -> "KVCache":
        """Extends the slot axis with empty slots (to run more tokens against a prefix)."""
        widths = [(0, 0), (0, num_slots - self.num_slots), (0, 0), (0, 0)]
        return KVCache(tuple(jnp.pad(k, widths) for k in self.k), tuple(jnp.pad(v, widths) for v in self.v))


class DecoderOutput(NamedTuple):
    logits: jax.Array | None          # float32[B, T, V]
    hidden_states: dict               # layer index -> float[B, T, D]
    cache: KVCache | None
    final_hidden: jax.Array           # float[B, T, D] after the final norm


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF rotate-half RoPE. x: float[B, T, H, D]; positions: int32[B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, query_start, deterministic):
        c = self.config
        dtype, pdtype = dtype_from_name(c.dtype), dtype_from_name(c.param_dtype)
        hd, hq, hkv = c.dim_per_head, c.num_heads, c.num_kv_heads
        lora = dict(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                    dtype=dtype, param_dtype=pdtype)
        b, t, _ = x.shape
        if c.fused_projections:
            qkv = LoRADense((hq + 2 * hkv) * hd, ("embed", "qkv"), name="qkv_proj", **lora)(x, deterministic)
            q, k, v = jnp.split(qkv, [hq * hd, (hq + hkv) * hd], axis=-1)
        else:
            q = LoRADense(hq * hd, ("embed", "heads"), use_bias=c.qkv_bias, name="q_proj", **lora)(x, deterministic)
            k = LoRADense(hkv * hd, ("embed", "kv_heads"), use_bias=c.qkv_bias, name="k_proj", **lora)(x, deterministic)
            v = LoRADense(hkv * hd, ("embed", "kv_heads"), use_bias=c.qkv_bias, name="v_proj", **lora)(x, deterministic)
        q = rotary_embedding(q.reshape(b, t, hq, hd), positions, c.rope_theta)
        k = rotary_embedding(k.reshape(b, t, hkv, hd), positions, c.rope_theta)
        v = v.reshape(b, t, hkv, hd)
        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), query_start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), query_start, axis=1)
            new_cache = (cache_k, cache_v)
            k, v = cache_k.astype(dtype), cache_v.astype(dtype)
        out = attn_lib.dot_product_attention(q, k, v, mask, implementation=c.attention_impl, rules=c.sharding_rules)
        out = out.reshape(b, t, hq * hd)
        out = LoRADense(c.hidden_size, ("heads", "embed"), name="o_proj", **lora)(out, deterministic)
        return out, new_cache


class MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(use_bias=False, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype))
        if c.fused_projections:
            gate_up = Dense(2 * c.intermediate_size, ("embed", "mlp"), name="gate_up_proj", **kw)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = Dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
            up = Dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = sharding.constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"), c.sharding_rules)
        return Dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, query_start, deterministic):
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype))
        h, new_cache = Attention(c, name="attn")(RMSNorm(name="input_layernorm", **norm)(x), positions, mask,
                                                 layer_cache, query_start, deterministic)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        x = sharding.constrain(x, ("batch", "length", "act_embed"), c.sharding_rules)
        return x, new_cache


class Decoder(nn.Module):
    """The decoder LM. Parameter tree: ``embed_tokens``, ``layers_{i}``, ``norm``, ``lm_head``."""
    config: DecoderConfig

    def setup(self):
        c = self.config
        pdtype = dtype_from_name(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, param_dtype=pdtype, dtype=dtype_from_name(c.dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        policy = remat_policy(c.remat_policy)
        layer_cls = DecoderLayer
        if policy is not None:
            layer_cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(6,))  # deterministic (self is 0)
        self.layers = [layer_cls(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=dtype_from_name(c.dtype), param_dtype=pdtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=dtype_from_name(c.dtype), param_dtype=pdtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings, float[B, T, D] (compute dtype)."""
        return self.embed_tokens(input_ids)

    def logits(self, final_hidden: jax.Array) -> jax.Array:
        """LM head on normed hidden states: float32[B, T, V]."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(final_hidden)
        else:
            out = self.lm_head(final_hidden)
        return sharding.constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"),
                                  self.config.sharding_rules)

    def __call__(self, *, positions: jax.Array, layout: attn_lib.SequenceLayout,
                 input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                 cache: KVCache | None = None, query_start: jax.Array | int = 0,
                 output_hidden_layers: Sequence[int] = (), compute_logits: bool = True,
                 deterministic: bool = True) -> DecoderOutput:
        """Runs T tokens.

        Args:
          positions: int32[B, T] position ids.
          layout: per-slot mask attributes over all S key slots (S = T without cache).
          input_ids: int32[B, T], or ``inputs_embeds`` float[B, T, D].
          cache: optional KVCache with S slots; the call writes slots
            ``[query_start, query_start + T)``.
          output_hidden_layers: which hidden states to return (0 = embeddings, i = output of
            layer i, HF numbering).
        """
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids / inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(dtype_from_name(c.dtype))
        x = sharding.constrain(x, ("batch", "length", "act_embed"), c.sharding_rules)
        t = x.shape[1]
        if cache is None and layout.valid.shape[1] != t:
            raise ValueError(f"layout has {layout.valid.shape[1]} slots but {t} tokens and no cache")
        mask = attn_lib.AttentionMask(layout, query_start)
        wanted = set(int(i) for i in output_hidden_layers)
        for i in wanted:
            if not 0 <= i <= c.num_layers:
                raise ValueError(f"hidden layer {i} out of range [0, {c.num_layers}]")
        hidden = {0: x} if 0 in wanted else {}
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, lc = layer(x, positions, mask, layer_cache, query_start, deterministic)
            if lc is not None:
                new_k.append(lc[0])
                new_v.append(lc[1])
            if i + 1 in wanted:
                hidden[i + 1] = x
        final = self.norm(x)
        new_cache = KVCache(tuple(new_k), tuple(new_v)) if cache is not None else None
        return DecoderOutput(self.logits(final) if compute_logits else None, hidden, new_cache, final)


def init_decoder(config: DecoderConfig, rng: jax.Array, batch: int = 1, length: int = 4):
    """Initializes (boxed) variables; use under ``jax.eval_shape`` for shapes/shardings."""
    model = Decoder(config)
    ids = jnp.zeros((batch, length), jnp.int32)
    layout = attn_lib.SequenceLayout.causal(jnp.ones((batch, length), bool))
    return model.init(rng, input_ids=ids, positions=jnp.zeros((batch, length), jnp.int32), layout=layout)
