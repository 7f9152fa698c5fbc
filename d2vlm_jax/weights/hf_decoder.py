"""HF ``transformers`` decoder checkpoints (Phi-3, Llama, Qwen2) <-> the Flax ``Decoder``.

The mapping table :func:`decoder_rules` is the single source of truth for key names, used
for loading (safetensors only) and for exporting back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from d2vlm_jax.models.decoder import DecoderConfig
from d2vlm_jax.weights.common import Rule, export_with_rules, linear_rules, load_with_rules


def decoder_rules(config: DecoderConfig, source_prefix: str = "model", flax_prefix: tuple[str, ...] = (),
                  lm_head_key: str = "lm_head") -> list[Rule]:
    """Rules mapping an HF ``*ForCausalLM`` state dict onto the Flax decoder tree."""
    p, f = source_prefix, flax_prefix
    rules = [Rule(f + ("embed_tokens", "embedding"), f"{p}.embed_tokens.weight"),
             Rule(f + ("norm", "scale"), f"{p}.norm.weight")]
    if not config.tie_word_embeddings:
        rules += linear_rules(f + ("lm_head",), lm_head_key, bias=False)
    for i in range(config.num_layers):
        lp, lf = f"{p}.layers.{i}", f + (f"layers_{i}",)
        rules += [Rule(lf + ("input_layernorm", "scale"), f"{lp}.input_layernorm.weight"),
                  Rule(lf + ("post_attention_layernorm", "scale"), f"{lp}.post_attention_layernorm.weight")]
        if config.fused_projections:
            rules += linear_rules(lf + ("attn", "qkv_proj", "base"), f"{lp}.self_attn.qkv_proj", bias=False)
            rules += linear_rules(lf + ("mlp", "gate_up_proj"), f"{lp}.mlp.gate_up_proj", bias=False)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                rules += linear_rules(lf + ("attn", name, "base"), f"{lp}.self_attn.{name}", bias=config.qkv_bias)
            for name in ("gate_proj", "up_proj"):
                rules += linear_rules(lf + ("mlp", name), f"{lp}.mlp.{name}", bias=False)
        rules += linear_rules(lf + ("attn", "o_proj", "base"), f"{lp}.self_attn.o_proj", bias=False)
        rules += linear_rules(lf + ("mlp", "down_proj"), f"{lp}.mlp.down_proj", bias=False)
    return rules


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` from an HF ``config.json`` dict."""
    model_type = hf_config.get("model_type", "")
    family = {"phi3": "phi3", "llama": "llama", "qwen2": "qwen2"}.get(model_type)
    if family is None:
        if "phi3" in model_type:
            family = "phi3"
        else:
            raise ValueError(f"config.json model_type {model_type!r} is not a supported decoder "
                             "(phi3, llama, qwen2)")
    heads = hf_config["num_attention_heads"]
    if hf_config.get("rope_scaling"):
        raise ValueError(f"config.json rope_scaling={hf_config['rope_scaling']!r} is not supported "
                         "(Phi-3-Mini-4K uses none)")
    if family == "llama" and hf_config.get("attention_bias"):
        raise ValueError("config.json attention_bias=true is not supported for llama")
    fields = dict(
        family=family,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or 0,
        rope_theta=float(hf_config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def load_decoder(source: Mapping[str, np.ndarray], config: DecoderConfig, target_shapes: Mapping,
                 **kwargs: Any) -> dict:
    """Loads an HF decoder state dict onto ``target_shapes`` (the decoder's param tree).

    LoRA parameters in the target (``lora_a``/``lora_b``) are not in an HF base
    checkpoint; they are returned freshly initialized by the caller and must be excluded
    from ``target_shapes`` (see ``lora.strip_lora``). With ``config.scan_layers`` the target
    holds the stacked ``layers`` subtree and layer ``i`` is loaded into its index ``i``.
    """
    params, _ = load_with_rules(source, decoder_rules(config), target_shapes, stacks=(config.layer_stack,), **kwargs)
    return params


def export_decoder(params: Mapping, config: DecoderConfig) -> dict[str, np.ndarray]:
    """The decoder's params (unrolled or scanned, without LoRA leaves or merged) as an HF
    state dict."""
    return export_with_rules(params, decoder_rules(config), stacks=(config.layer_stack,))


def resize_vocab(params: dict, new_vocab_size: int) -> dict:
    """Grows embedding and LM head to ``new_vocab_size``; new rows are the mean of the old.

    This is how the added ``<evi>``/``</evi>`` tokens start (SPEC §1.4).
    """
    out = dict(params)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    extra = new_vocab_size - emb.shape[0]
    if extra < 0:
        raise ValueError(f"resize_vocab: cannot shrink vocabulary {emb.shape[0]} -> {new_vocab_size}")
    if extra == 0:
        return out
    out["embed_tokens"] = {"embedding": np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), extra, 0)])}
    if "lm_head" in params:
        head = np.asarray(params["lm_head"]["kernel"])  # [D, V]
        out["lm_head"] = {"kernel": np.concatenate([head, np.repeat(head.mean(1, keepdims=True), extra, 1)], 1)}
    return out
