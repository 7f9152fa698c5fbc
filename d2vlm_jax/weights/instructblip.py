"""Video-encoder checkpoints (EVA-ViT-g + Q-Former + compressor) <-> the Flax ``VideoEncoder``.

Two source layouts, each one mapping table of :class:`~d2vlm_jax.weights.common.Rule`
(flax path -> source key + transform), used for loading (safetensors only, via
:class:`~d2vlm_jax.weights.common.SafetensorsReader`) and for exporting back
(:func:`export_params`):

``"hf"`` — HF ``InstructBlip*`` state dicts:
  ``vision_model.embeddings.{patch_embedding, class_embedding, position_embedding}``,
  ``vision_model.encoder.layers.{i}.{layer_norm1, self_attn.qkv, self_attn.projection,
  layer_norm2, mlp.fc1, mlp.fc2}``, ``qformer.embeddings.{word_embeddings,
  position_embeddings, layernorm}``, ``qformer.encoder.layer.{i}.{attention,
  crossattention}.{attention.{query,key,value}, output.{dense,LayerNorm}}``,
  ``...{intermediate, intermediate_query}.dense``, ``...{output, output_query}.{dense,
  LayerNorm}``, ``query_tokens`` and ``vision_model.post_layernorm`` (= LAVIS ``ln_vision``;
  HF applies it after the last of its 39 blocks, which is exactly our ``ln_vision`` input).
  HF fuses the attention bias into ``self_attn.qkv.bias = [q_bias; k_bias; v_bias]``: q and v
  are sliced out, the k part is dropped (a key bias adds the same ``q·b_k`` to every score
  of a query, which softmax ignores, so dropping it is exact) and exported as zeros.
  HF checkpoints have no frame compressor: those parameters keep their given values.

``"authors"`` — the D²VLM / E.T. Chat checkpoint:
  ``model.vision_tower.vision_tower.{patch_embed.proj, cls_token, pos_embed,
  blocks.{i}.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1,
  mlp.fc2}}`` (LAVIS EVA-ViT names), ``model.qformer_bert.bert.embeddings.{word_embeddings,
  position_embeddings, LayerNorm}``, ``model.qformer_bert.bert.encoder.layer.{i}.{attention,
  crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}}`` + the FFNs as above,
  ``model.qformer_query``, ``model.qformer_ln``, ``model.qformer_proj`` and
  ``model.qformer_{q,k,v}_proj.{0 (LayerNorm), 1 (Linear)}``.

Keys of the checkpoint that no rule uses (LLM weights, the BERT LM head, HF's vision blocks
beyond ``output_layer``, ``position_ids`` buffers) are returned as ``ignored_keys``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from d2vlm_jax import sharding
from d2vlm_jax.models.compressor import CompressorConfig
from d2vlm_jax.models.layers import dtype_from_name
from d2vlm_jax.models.stacking import LayerStack
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.models.video_encoder import VideoEncoderConfig
from d2vlm_jax.models.vision import VisionConfig
from d2vlm_jax.weights.common import CheckpointError, Rule, get_param, linear_rules, load_with_rules

LAYOUTS = ("hf", "authors")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SliceRule(Rule):
    """``params[flax_path] = source[source_key][start:stop]``; several SliceRules may share a
    key (export writes each slice into a zero tensor of length ``full``)."""
    start: int = 0
    stop: int = 0
    full: int = 0


def _slice_rule(flax_path: Path, key: str, start: int, stop: int, full: int) -> SliceRule:
    def take(a: np.ndarray) -> np.ndarray:
        # A wrong-length source is passed through whole so the shape check reports it.
        return a[start:stop] if a.shape[:1] == (full,) else a
    return SliceRule(flax_path, key, take, None, start, stop, full)


def _layernorm(flax_path: Path, key: str) -> list[Rule]:
    return [Rule(flax_path + ("scale",), f"{key}.weight"), Rule(flax_path + ("bias",), f"{key}.bias")]


def _drop_leading_ones(a: np.ndarray, ndim: int) -> np.ndarray:
    """[1, ..., 1, *shape] -> shape (``ndim`` trailing dims); other shapes pass through."""
    extra = a.ndim - ndim
    return a.reshape(a.shape[extra:]) if extra > 0 and all(s == 1 for s in a.shape[:extra]) else a


def _leading_ones_rule(flax_path: Path, key: str, source_ndim: int, flax_ndim: int) -> Rule:
    return Rule(flax_path, key, lambda a: _drop_leading_ones(a, flax_ndim),
                lambda x: x.reshape((1,) * (source_ndim - flax_ndim) + x.shape))


def _patch_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """torch conv weight [D, 3, P, P] -> Dense kernel [P*P*3, D] (patches flattened (row, col, c))."""
    if w.ndim != 4:
        return w
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


def _patch_kernel_to_source(k: np.ndarray) -> np.ndarray:
    p = math.isqrt(k.shape[0] // 3)
    return np.ascontiguousarray(k.reshape(p, p, 3, k.shape[1]).transpose(3, 2, 0, 1))


def vision_rules(config: VisionConfig, layout: str, source_prefix: str | None = None,
                 flax_prefix: Path = ("vision",)) -> list[Rule]:
    """Rules for the vision tower (blocks ``0 .. num_blocks_run - 1`` only).

    ``source_prefix`` defaults to ``vision_model`` (hf) / ``model.vision_tower.vision_tower``
    (authors).
    """
    _check_layout(layout)
    f, d = flax_prefix, config.width
    if layout == "hf":
        p = "vision_model" if source_prefix is None else source_prefix
        rules = [Rule(f + ("patch_embed", "kernel"), f"{p}.embeddings.patch_embedding.weight",
                      _patch_kernel_to_flax, _patch_kernel_to_source),
                 Rule(f + ("patch_embed", "bias"), f"{p}.embeddings.patch_embedding.bias"),
                 _leading_ones_rule(f + ("cls_token",), f"{p}.embeddings.class_embedding", 3, 1),
                 _leading_ones_rule(f + ("pos_embed",), f"{p}.embeddings.position_embedding", 3, 2)]
        for i in range(config.num_blocks_run):
            lp, lf = f"{p}.encoder.layers.{i}", f + (f"blocks_{i}",)
            rules += _layernorm(lf + ("norm1",), f"{lp}.layer_norm1")
            rules += linear_rules(lf + ("attn", "qkv"), f"{lp}.self_attn.qkv", bias=False)
            rules += [_slice_rule(lf + ("attn", "q_bias"), f"{lp}.self_attn.qkv.bias", 0, d, 3 * d),
                      _slice_rule(lf + ("attn", "v_bias"), f"{lp}.self_attn.qkv.bias", 2 * d, 3 * d, 3 * d)]
            rules += linear_rules(lf + ("attn", "proj"), f"{lp}.self_attn.projection", bias=True)
            rules += _layernorm(lf + ("norm2",), f"{lp}.layer_norm2")
            rules += linear_rules(lf + ("fc1",), f"{lp}.mlp.fc1", bias=True)
            rules += linear_rules(lf + ("fc2",), f"{lp}.mlp.fc2", bias=True)
        return rules
    p = "model.vision_tower.vision_tower" if source_prefix is None else source_prefix
    rules = [Rule(f + ("patch_embed", "kernel"), f"{p}.patch_embed.proj.weight",
                  _patch_kernel_to_flax, _patch_kernel_to_source),
             Rule(f + ("patch_embed", "bias"), f"{p}.patch_embed.proj.bias"),
             _leading_ones_rule(f + ("cls_token",), f"{p}.cls_token", 3, 1),
             _leading_ones_rule(f + ("pos_embed",), f"{p}.pos_embed", 3, 2)]
    for i in range(config.num_blocks_run):
        lp, lf = f"{p}.blocks.{i}", f + (f"blocks_{i}",)
        rules += _layernorm(lf + ("norm1",), f"{lp}.norm1")
        rules += linear_rules(lf + ("attn", "qkv"), f"{lp}.attn.qkv", bias=False)
        rules += [Rule(lf + ("attn", "q_bias"), f"{lp}.attn.q_bias"),
                  Rule(lf + ("attn", "v_bias"), f"{lp}.attn.v_bias")]
        rules += linear_rules(lf + ("attn", "proj"), f"{lp}.attn.proj", bias=True)
        rules += _layernorm(lf + ("norm2",), f"{lp}.norm2")
        rules += linear_rules(lf + ("fc1",), f"{lp}.mlp.fc1", bias=True)
        rules += linear_rules(lf + ("fc2",), f"{lp}.mlp.fc2", bias=True)
    return rules


def qformer_rules(config: QFormerConfig, layout: str, source_prefix: str | None = None,
                  query_tokens_key: str | None = None, ln_vision_key: str | None = None,
                  flax_prefix: Path = ("qformer",)) -> list[Rule]:
    """Rules for the Q-Former, its ``query_tokens`` and ``ln_vision``.

    Defaults — hf: ``qformer``, ``query_tokens``, ``vision_model.post_layernorm``;
    authors: ``model.qformer_bert.bert``, ``model.qformer_query``, ``model.qformer_ln``.
    """
    _check_layout(layout)
    hf = layout == "hf"
    p = source_prefix if source_prefix is not None else ("qformer" if hf else "model.qformer_bert.bert")
    qkey = query_tokens_key or ("query_tokens" if hf else "model.qformer_query")
    lnkey = ln_vision_key or ("vision_model.post_layernorm" if hf else "model.qformer_ln")
    attn_inner = "attention" if hf else "self"     # HF renamed BERT's attention.self
    emb_norm = "layernorm" if hf else "LayerNorm"
    f = flax_prefix
    rules = [_leading_ones_rule(f + ("query_tokens",), qkey, 3, 2),
             *_layernorm(f + ("ln_vision",), lnkey),
             Rule(f + ("embeddings", "word_embeddings"), f"{p}.embeddings.word_embeddings.weight"),
             Rule(f + ("embeddings", "position_embeddings"), f"{p}.embeddings.position_embeddings.weight"),
             *_layernorm(f + ("embeddings", "layernorm"), f"{p}.embeddings.{emb_norm}")]
    for i in range(config.num_layers):
        lp, lf = f"{p}.encoder.layer.{i}", f + (f"layers_{i}",)
        subs = [("attention", "self_attn")]
        if config.has_cross_attention(i):
            subs.append(("crossattention", "cross_attn"))
        for src, dst in subs:
            for name in ("query", "key", "value"):
                rules += linear_rules(lf + (dst, name), f"{lp}.{src}.{attn_inner}.{name}", bias=True)
            rules += linear_rules(lf + (dst, "out"), f"{lp}.{src}.output.dense", bias=True)
            rules += _layernorm(lf + (dst, "norm"), f"{lp}.{src}.output.LayerNorm")
        for suffix, dst in (("", "ffn_text"), ("_query", "ffn_query")):
            rules += linear_rules(lf + (dst, "intermediate"), f"{lp}.intermediate{suffix}.dense", bias=True)
            rules += linear_rules(lf + (dst, "output"), f"{lp}.output{suffix}.dense", bias=True)
            rules += _layernorm(lf + (dst, "norm"), f"{lp}.output{suffix}.LayerNorm")
    return rules


def compressor_rules(config: CompressorConfig, source_prefix: str = "model",
                     flax_prefix: Path = ("compressor",)) -> list[Rule]:
    """Rules for the frame compressor (authors' layout only: HF has no such module)."""
    del config  # shapes come from the model tree
    p, f = source_prefix, flax_prefix
    rules = linear_rules(f + ("proj",), f"{p}.qformer_proj", bias=True)
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += _layernorm(f + (name, "norm"), f"{p}.qformer_{name}.0")
        rules += linear_rules(f + (name, "linear"), f"{p}.qformer_{name}.1", bias=True)
    return rules


def video_encoder_rules(config: VideoEncoderConfig, layout: str) -> list[Rule]:
    """The whole table for one layout (hf: vision + Q-Former; authors: all three parts)."""
    rules = vision_rules(config.vision, layout) + qformer_rules(config.qformer, layout)
    if layout == "authors":
        rules += compressor_rules(config.compressor)
    return rules


def load_video_encoder(source: Mapping[str, np.ndarray], config: VideoEncoderConfig, layout: str,
                       params: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Loads the encoder's parameters from a checkpoint.

    Args:
      source: key -> array, e.g. ``SafetensorsReader(path)`` (safetensors only).
      config: the encoder config (decides which vision blocks / cross-attention layers exist).
      layout: ``"hf"`` or ``"authors"``.
      params: the encoder's param tree (``{'vision', 'qformer', 'compressor'}``), real or
        abstract (``jax.eval_shape`` of init; Flax boxes are removed), in the layout of
        ``config`` (``scan_layers``: stacked blocks / layers). For ``"hf"`` the
        ``compressor`` subtree is not in the checkpoint and is returned unchanged, so it must
        hold real arrays there.

    Returns:
      ``(params, ignored_keys)``: numpy arrays in ``param_dtype``, and the sorted checkpoint
      keys no rule used.

    Raises:
      CheckpointError: naming each missing key (with the model path and shape) and each shape
        mismatch (key, checkpoint shape, model shape).
    """
    _check_layout(layout)
    params = sharding.unbox(params)
    parts = ("vision", "qformer") + (("compressor",) if layout == "authors" else ())
    target = {k: params[k] for k in parts}
    dtype = dtype_from_name(config.vision.param_dtype)
    loaded, ignored = load_with_rules(source, video_encoder_rules(config, layout), target,
                                      dtype=np.dtype(dtype), ignore_unused=lambda key: True,
                                      stacks=config.layer_stacks)
    out = dict(params)
    out.update(loaded)
    for k in set(out) - set(parts):
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(out[k])):
            raise CheckpointError(f"layout {layout!r} has no weights for {k!r} and the given params for it "
                                  f"are abstract: pass initialized params to keep")
    return out, ignored


def export_params(params: Mapping[str, Any], rules: list[Rule], stacks: Sequence[LayerStack] = ()
                  ) -> dict[str, np.ndarray]:
    """The reverse of loading: ``source_key -> array`` in the table's layout (``stacks``:
    the params' layer stacks, e.g. ``config.layer_stacks``).

    Keys split over several :class:`SliceRule` (HF's fused ``qkv.bias``) are reassembled,
    with zeros where no parameter maps (the key bias).
    """
    params = sharding.unbox(params)
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        value = np.asarray(get_param(params, rule.flax_path, stacks))
        if isinstance(rule, SliceRule):
            buf = out.setdefault(rule.source_key, np.zeros((rule.full,) + value.shape[1:], value.dtype))
            buf[rule.start:rule.stop] = value
        else:
            out[rule.source_key] = np.ascontiguousarray(rule.to_source(value))
    return out


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; use one of {LAYOUTS}")
