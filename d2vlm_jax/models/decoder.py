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

Layers are unrolled (``layers_{i}``, 1:1 with HF checkpoints) or, with ``scan_layers``, one
``nn.scan`` over a stacked ``layers`` subtree (``[L, ...]`` leaves; compile time no longer
grows with depth). Both run the same :class:`DecoderLayer` through the same step function;
``d2vlm_jax.models.stacking`` converts parameters between the two layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from d2vlm_jax import sharding
from d2vlm_jax.models import attention as attn_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.layers import Dense, LoRADense, RMSNorm, dtype_from_name, remat_layer

FAMILIES = ("phi3", "llama", "qwen2")

# Values tagged inside a decoder layer, for ``remat_policy="save:<names>"``.
CHECKPOINT_NAMES = ("qkv", "attn_context", "attn_out", "mlp_hidden", "mlp_out")


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
    scan_layers: bool = False     # one nn.scan over stacked layers instead of L unrolled ones
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

    @property
    def layer_stack(self) -> stacking.LayerStack:
        """Where the layers sit in the decoder's parameter tree, and in which layout."""
        return stacking.LayerStack((), "layers_", "layers", self.num_layers, 1, self.scan_layers)

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
    """Keys and values of every layer, stacked: float[L, B, S, Hkv, D] each.

    A call writes only its new tokens' slots (``dynamic_update_slice`` at ``[layer, :,
    query_start]``), so inside the decoding ``while_loop`` the update is in place and costs
    one token per layer, in the unrolled and the scanned decoder alike.
    """
    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(config: DecoderConfig, batch: int, num_slots: int, dtype=None) -> "KVCache":
        shape = (config.num_layers, batch, num_slots, config.num_kv_heads, config.dim_per_head)
        dtype = dtype or dtype_from_name(config.dtype)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    def pad_to(self, num_slots: int) -> "KVCache":
        """Extends the slot axis with empty slots (to run more tokens against a prefix)."""
        widths = [(0, 0), (0, 0), (0, num_slots - self.num_slots), (0, 0), (0, 0)]
        return KVCache(jnp.pad(self.k, widths), jnp.pad(self.v, widths))

    def layer(self, i: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """Layer ``i``'s (keys, values), float[B, S, Hkv, D] each (``i`` may be traced)."""
        return self.k[i], self.v[i]

    def write(self, i: jax.Array | int, start: jax.Array | int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Writes layer ``i``'s new keys/values float[B, T, Hkv, D] at slots ``[start, start + T)``."""
        zero = jnp.zeros((), jnp.int32)
        index = (jnp.asarray(i, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), index),
                       jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), index))


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
        """x float[B, T, D]; layer_cache (keys, values) float[B, S, Hkv, Dh] or None.

        Returns (float[B, T, D], (keys, values) of the T new tokens float[B, T, Hkv, Dh])."""
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
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        new_kv = (k, v)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), query_start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), query_start, axis=1)
            k, v = k.astype(dtype), v.astype(dtype)
        out = attn_lib.dot_product_attention(q, k, v, mask, implementation=c.attention_impl, rules=c.sharding_rules)
        out = checkpoint_name(out.reshape(b, t, hq * hd), "attn_context")
        out = LoRADense(c.hidden_size, ("heads", "embed"), name="o_proj", **lora)(out, deterministic)
        return checkpoint_name(out, "attn_out"), new_kv


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
        h = checkpoint_name(h, "mlp_hidden")
        return checkpoint_name(Dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h), "mlp_out")


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, query_start, deterministic):
        """See :class:`Attention`; returns (float[B, T, D], new (keys, values))."""
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype))
        h, new_kv = Attention(c, name="attn")(RMSNorm(name="input_layernorm", **norm)(x), positions, mask,
                                              layer_cache, query_start, deterministic)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        x = sharding.constrain(x, ("batch", "length", "act_embed"), c.sharding_rules)
        return x, new_kv


def _layer_step(layer: nn.Module, x: jax.Array, cache: KVCache | None, i, positions, mask, query_start,
                deterministic: bool) -> tuple[jax.Array, KVCache | None]:
    """Layer ``i`` (static or traced) on ``x``; its new keys/values go into ``cache``. The
    cache is sliced and written here, outside the (rematerialized) layer, so remat saves
    one layer's cache slice, never the whole stack."""
    x, (k, v) = layer(x, positions, mask, None if cache is None else cache.layer(i), query_start, deterministic)
    return x, (None if cache is None else cache.write(i, query_start, k, v))


class Decoder(nn.Module):
    """The decoder LM. Parameter tree: ``embed_tokens``, ``layers_{i}`` (or, scanned, one
    ``layers`` subtree with ``[L, ...]`` leaves), ``norm``, ``lm_head``."""
    config: DecoderConfig

    def setup(self):
        c = self.config
        pdtype = dtype_from_name(c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, param_dtype=pdtype, dtype=dtype_from_name(c.dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        # deterministic (argument 6, self is 0) is a Python bool
        layer_cls = remat_layer(DecoderLayer, c.remat_policy, scanned=c.scan_layers, static_argnums=(6,))
        if c.scan_layers:
            self.layers = layer_cls(c, name="layers")
        else:
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
        wanted = sorted(set(int(i) for i in output_hidden_layers))
        for i in wanted:
            if not 0 <= i <= c.num_layers:
                raise ValueError(f"hidden layer {i} out of range [0, {c.num_layers}]")
        hidden = {0: x} if 0 in wanted else {}
        if c.scan_layers:
            x, cache, taken = self._scan(x, cache, positions, mask, query_start, deterministic,
                                         tuple(w for w in wanted if 0 < w < c.num_layers))
            hidden.update(taken)
        else:
            for i, layer in enumerate(self.layers):
                x, cache = _layer_step(layer, x, cache, i, positions, mask, query_start, deterministic)
                if i + 1 in wanted:
                    hidden[i + 1] = x
        if c.num_layers in wanted:
            hidden[c.num_layers] = x
        final = self.norm(x)
        return DecoderOutput(self.logits(final) if compute_logits else None, hidden, cache, final)

    def _scan(self, x, cache, positions, mask, query_start, deterministic, taken_layers):
        """All layers as one ``nn.scan``. The hidden states of ``taken_layers`` (each in
        ``1..L-1``) are carried buffers replaced when the layer index matches (two ``select``
        per layer each; no per-layer output stack, no split of the parameter stack)."""

        def body(layer, carry, i, positions, mask, query_start):
            x, cache, taken = carry
            x, cache = _layer_step(layer, x, cache, i, positions, mask, query_start, deterministic)
            taken = tuple(jnp.where(i + 1 == w, x, h) for w, h in zip(taken_layers, taken))
            return (x, cache, taken), None

        run = stacking.scan_layers(body, self.config.num_layers, broadcast_args=3)
        carry = (x, cache, tuple(jnp.zeros_like(x) for _ in taken_layers))
        query_start = jnp.asarray(query_start, jnp.int32)  # broadcast arguments are arrays
        mask = attn_lib.AttentionMask(mask.layout, query_start)
        (x, cache, taken), _ = run(self.layers, carry, jnp.arange(self.config.num_layers, dtype=jnp.int32),
                                   positions, mask, query_start)
        return x, cache, dict(zip(taken_layers, taken))


def init_decoder(config: DecoderConfig, rng: jax.Array, batch: int = 1, length: int = 4):
    """Initializes (boxed) variables; use under ``jax.eval_shape`` for shapes/shardings."""
    model = Decoder(config)
    ids = jnp.zeros((batch, length), jnp.int32)
    layout = attn_lib.SequenceLayout.causal(jnp.ones((batch, length), bool))
    return model.init(rng, input_ids=ids, positions=jnp.zeros((batch, length), jnp.int32), layout=layout)
