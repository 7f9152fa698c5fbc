"""The authors' D²VLM checkpoints (PyTorch, E.T. Chat layout) <-> d2vlm-jax (Orbax + JSON config).

Checkpoint forms read (safetensors only; ``.bin``/``.pt`` are refused with how to convert):

* **full**: ``config.json`` + ``model.safetensors`` or shards + ``model.safetensors.index.json``
  (the authors' ``save_full_model`` output, LoRA already merged);
* **split**: ``config.json`` + ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT
  LoRA: ``base_model.model.<key>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``, scale
  ``lora_alpha / r``) + ``pytorch_model.safetensors`` (the trained non-LoRA tensors, PEFT
  names ``base_model.model.<key>``) on top of a **base** model directory (full form; from
  ``--base`` or ``config.json``'s ``model_name_or_path``). The partial file overrides the
  base (the base's shadowed keys are listed in the report).

One mapping table, :func:`d2vlm_rules` (decoder + video encoder in the ``authors`` layout +
grounding heads ``{frm,evi}_head.{0: LayerNorm, 1: fc1, 3: fc2}`` + optional LoRA adapters),
serves import and export. Keys the authors' checkpoint carries but D²VLM never uses (the
Q-Former's BERT LM head, vision blocks past ``vision_output_layer``, the vision final norm,
RoPE ``inv_freq`` and ``position_ids`` buffers, E.T. Chat's ``vid_head``) are returned with a
reason (:func:`ignored_reason`); any other unused key is an error.

The model config comes from ``config.json`` plus the tensor shapes (the authors hard-code the
EVA-ViT-g and BERT sizes: head dims 88 and 64, 40 pretrained blocks); ``hidden_add_index``
(k_evi) is read when present, else the authors' hard-coded 6.

Output of :func:`import_checkpoint` (a directory): ``params/`` (Orbax, the plain nested dict
``{video, llm, frm_head, evi_head}``), ``d2vlm_config.json`` (:func:`load_model_config`),
``authors_config.json`` (the source ``config.json``, kept for export), ``import_report.json``
and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from d2vlm_jax import sharding
from d2vlm_jax.models.compressor import CompressorConfig
from d2vlm_jax.models.d2vlm import D2VLMConfig, abstract_variables
from d2vlm_jax.models.decoder import DecoderConfig
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.models.video_encoder import VideoEncoderConfig
from d2vlm_jax.models.vision import VisionConfig
from d2vlm_jax.weights.common import (PICKLE_SUFFIXES, CheckpointError, Rule, SafetensorsReader, get_param,
                                      linear_rules, load_with_rules, read_json, sharded_placer, source_shape, transpose,
                                      write_safetensors)
from d2vlm_jax.weights.hf_decoder import config_from_hf, decoder_rules
from d2vlm_jax.weights.instructblip import video_encoder_rules

log = logging.getLogger(__name__)

Path = tuple[str, ...]

CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PARTIAL_FILE = "pytorch_model.safetensors"       # the authors' trained non-LoRA tensors
PEFT_PREFIX = "base_model.model."
MODEL_CONFIG_FILE = "d2vlm_config.json"
AUTHORS_CONFIG_FILE = "authors_config.json"
REPORT_FILE = "import_report.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "generation_config.json")

VISION_PREFIX = "model.vision_tower.vision_tower"
QFORMER_PREFIX = "model.qformer_bert.bert"
EVA_HEAD_DIM = 88            # EVA-ViT-g: num_heads = 1408 // 88
EVA_PRETRAINED_DEPTH = 40    # a negative vision_output_layer counts from this
BERT_HEAD_DIM = 64           # bert-base: 768 // 12
AUTHORS_K_EVI = 6            # the authors' hard-coded hidden_add_index
FAMILY_MODEL_TYPE = {"phi3": "etchat_phi3", "llama": "etchat_llama", "qwen2": "etchat_qwen2"}
FAMILY_ARCH = {"phi3": "ETChatPhi3ForCausalLM", "llama": "ETChatLlamaForCausalLM", "qwen2": "ETChatQwen2ForCausalLM"}
HEADS = ("frm_head", "evi_head")


# ----------------------------------------------------------------------------- mapping table


def head_rules(name: str) -> list[Rule]:
    """``{name}.0`` LayerNorm, ``.1`` Linear(d, d/2), ``.3`` Linear(d/2, d) (``.2`` is the GELU)."""
    f = (name,)
    return [Rule(f + ("norm", "scale"), f"{name}.0.weight"), Rule(f + ("norm", "bias"), f"{name}.0.bias"),
            *linear_rules(f + ("fc1",), f"{name}.1", bias=True), *linear_rules(f + ("fc2",), f"{name}.3", bias=True)]


def lora_rules(config: DecoderConfig) -> list[Rule]:
    """LoRA adapters: flax ``lora_a [in, r]`` / ``lora_b [r, out]`` <- PEFT ``lora_A.weight [r, in]``
    / ``lora_B.weight [out, r]`` (keys without the ``base_model.model.`` prefix)."""
    rules = []
    for i in range(config.num_layers):
        for name in config.lora_targets:
            key, path = f"model.layers.{i}.self_attn.{name}", ("llm", f"layers_{i}", "attn", name)
            rules += [Rule(path + ("lora_a",), f"{key}.lora_A.weight", transpose, transpose),
                      Rule(path + ("lora_b",), f"{key}.lora_B.weight", transpose, transpose)]
    return rules


def _prefixed(rules: Sequence[Rule], prefix: Path) -> list[Rule]:
    return [dataclasses.replace(r, flax_path=prefix + r.flax_path) for r in rules]


def d2vlm_rules(config: D2VLMConfig, *, adapters: bool | None = None) -> list[Rule]:
    """The whole model's table (flax path under ``params`` <- authors' key).

    ``adapters`` (default: ``config.llm.lora_rank > 0``) adds the LoRA rules.
    """
    adapters = config.llm.lora_rank > 0 if adapters is None else adapters
    rules = decoder_rules(config.llm, source_prefix="model", flax_prefix=("llm",), lm_head_key="lm_head")
    rules += _prefixed(video_encoder_rules(config.video, "authors"), ("video",))
    for name in HEADS:
        rules += head_rules(name)
    if adapters:
        rules += lora_rules(config.llm)
    return rules


_IGNORED_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"model\.qformer_bert\.cls\..*", "Q-Former BERT LM head (D²VLM uses only the encoder)"),
    (r".*\.position_ids", "position-id buffer (recomputed)"),
    (r".*rotary_emb\.inv_freq", "RoPE buffer (recomputed)"),
    (r".*relative_position_index", "buffer"),
    (rf"{re.escape(VISION_PREFIX)}\.(norm|fc_norm|head|lm_head)\..*",
     "vision final norm/head (D²VLM reads a block's output without norm)"),
    (r"vid_head\..*", "E.T. Chat matching head (use_matching), unused by D²VLM's evidence mode"),
)


def ignored_reason(key: str, config: D2VLMConfig) -> str | None:
    """Why an unused authors' key may be dropped, or None when it must not be."""
    m = re.fullmatch(rf"{re.escape(VISION_PREFIX)}\.blocks\.(\d+)\..*", key)
    if m and int(m.group(1)) >= config.video.vision.num_blocks_run:
        run = config.video.vision.num_blocks_run
        return f"vision block {m.group(1)} is past vision_output_layer ({run} blocks run)"
    for pattern, reason in _IGNORED_PATTERNS:
        if re.fullmatch(pattern, key):
            return reason
    return None


# ----------------------------------------------------------------------------- sources


class OverlaySource(Mapping[str, np.ndarray]):
    """Several ``key -> array`` sources seen as one; the first that has a key wins.

    ``renames[i]`` maps the i-th source's keys to the merged names (None = keep).
    ``shadowed`` lists keys of later sources hidden by earlier ones.
    """

    def __init__(self, sources: Sequence[Mapping[str, np.ndarray]],
                 renames: Sequence[Callable[[str], str] | None] | None = None, names: Sequence[str] = ()):
        renames = renames or [None] * len(sources)
        self._where: dict[str, tuple[int, str]] = {}
        self.shadowed: list[str] = []
        self.origin: dict[str, str] = {}
        for i, (src, rename) in enumerate(zip(sources, renames)):
            for raw in src:
                key = rename(raw) if rename else raw
                if key in self._where:
                    if self._where[key][0] == i:
                        raise CheckpointError(f"{names[i] if names else i}: keys {raw!r} and "
                                              f"{self._where[key][1]!r} both map to {key!r}")
                    self.shadowed.append(f"{names[i] if names else i}:{raw}")
                    continue
                self._where[key] = (i, raw)
                self.origin[key] = names[i] if names else str(i)
        self._sources = list(sources)

    def __getitem__(self, key: str) -> np.ndarray:
        i, raw = self._where[key]
        return self._sources[i][raw]

    def shape(self, key: str) -> tuple[int, ...]:
        i, raw = self._where[key]
        return source_shape(self._sources[i], raw)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LoraMergingSource(Mapping[str, np.ndarray]):
    """``X.weight`` of every adapted linear is served as ``W + (alpha / r) * B @ A`` (float32,
    one tensor at a time); the adapter keys themselves are consumed (:attr:`consumed`)."""

    def __init__(self, inner: Mapping[str, np.ndarray], scale: float):
        self.inner, self.scale = inner, scale
        self._adapters: dict[str, tuple[str, str]] = {}
        for key in inner:
            if key.endswith(".lora_A.weight"):
                base = key[: -len(".lora_A.weight")]
                b_key = f"{base}.lora_B.weight"
                if b_key not in inner:
                    raise CheckpointError(f"adapter {key!r} has no matching {b_key!r}")
                self._adapters[f"{base}.weight"] = (key, b_key)
        self.consumed: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        w = self.inner[key]
        if key in self._adapters:
            a_key, b_key = self._adapters[key]
            a, b = np.asarray(self.inner[a_key], np.float32), np.asarray(self.inner[b_key], np.float32)
            if w.shape != (b.shape[0], a.shape[1]):
                raise CheckpointError(f"cannot merge LoRA into {key!r}: weight {w.shape} vs lora_B {b.shape} @ "
                                      f"lora_A {a.shape}")
            w = (w.astype(np.float32) + np.float32(self.scale) * (b @ a)).astype(np.float32)
            self.consumed.update((a_key, b_key))
        return w

    def shape(self, key: str) -> tuple[int, ...]:
        return source_shape(self.inner, key)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def adapted_keys(self) -> list[str]:
        return sorted(self._adapters)


def _peft_name(key: str) -> str:
    """PEFT names -> plain authors' names (prefix, ``.base_layer``, adapter name ``default``)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)


@dataclasses.dataclass
class AuthorsCheckpoint:
    """An opened authors' checkpoint directory (nothing read but headers and JSON)."""
    path: str
    form: str                      # "full" | "split"
    hf_config: dict
    source: Mapping[str, np.ndarray]   # merged view, authors' plain key names
    base_path: str | None = None
    adapter_config: dict | None = None

    @property
    def has_adapters(self) -> bool:
        return self.adapter_config is not None


def _refuse_pickles(path: str) -> None:
    """Pickled weights are never loaded: raise with the conversion recipe when a directory
    has them where safetensors are expected."""
    pickled = sorted(f for s in PICKLE_SUFFIXES for f in glob.glob(os.path.join(path, "*" + s)))
    if not pickled:
        return
    split_pairs = {"adapter_model.bin": ADAPTER_FILE, "non_lora_trainables.bin": PARTIAL_FILE}
    for f in pickled:
        counterpart = split_pairs.get(os.path.basename(f))
        if counterpart and not os.path.isfile(os.path.join(path, counterpart)):
            SafetensorsReader(f)  # raises with the conversion recipe
    if not glob.glob(os.path.join(path, "*.safetensors")):
        SafetensorsReader(pickled[0])


def open_authors_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> AuthorsCheckpoint:
    """Opens a full or split authors' checkpoint directory (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    hf_config = read_json(cfg_path)
    _refuse_pickles(path)
    adapter, partial = os.path.join(path, ADAPTER_FILE), os.path.join(path, PARTIAL_FILE)
    if not (os.path.isfile(adapter) or os.path.isfile(partial)):
        return AuthorsCheckpoint(path, "full", hf_config, SafetensorsReader(path))
    base = base or hf_config.get("model_name_or_path")
    if base and not os.path.isabs(base) and os.path.isdir(os.path.join(path, base)):
        base = os.path.join(path, base)
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{path}: split checkpoint ({ADAPTER_FILE} / {PARTIAL_FILE}) needs its base model "
                              f"directory: config.json model_name_or_path={hf_config.get('model_name_or_path')!r} "
                              "is not a directory here; pass base=")
    sources, renames, names = [], [], []
    adapter_config = None
    if os.path.isfile(partial):
        sources.append(SafetensorsReader(partial)); renames.append(_peft_name); names.append(PARTIAL_FILE)
    if os.path.isfile(adapter):
        acfg_path = os.path.join(path, ADAPTER_CONFIG_FILE)
        if not os.path.isfile(acfg_path):
            raise CheckpointError(f"{path}: {ADAPTER_FILE} without {ADAPTER_CONFIG_FILE}")
        adapter_config = read_json(acfg_path)
        for field in ("r", "lora_alpha", "target_modules"):
            if field not in adapter_config:
                raise CheckpointError(f"{acfg_path}: missing field {field!r}")
        if adapter_config.get("use_rslora") or adapter_config.get("use_dora"):
            raise CheckpointError(f"{acfg_path}: rsLoRA / DoRA adapters are not supported")
        if adapter_config.get("bias", "none") != "none":
            raise CheckpointError(f"{acfg_path}: bias={adapter_config['bias']!r}; only 'none' is supported")
        sources.append(SafetensorsReader(adapter)); renames.append(_peft_name); names.append(ADAPTER_FILE)
    base_reader = SafetensorsReader(base)
    sources.append(base_reader); renames.append(None); names.append(f"base:{base}")
    return AuthorsCheckpoint(path, "split", hf_config, OverlaySource(sources, renames, names), os.fspath(base),
                             adapter_config)


# ----------------------------------------------------------------------------- config


def _count_indices(keys, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.fullmatch(k))}


def _need(source: Mapping, key: str) -> tuple[int, ...]:
    if key not in source:
        raise CheckpointError(f"checkpoint lacks {key!r} (needed to size the model)")
    return source_shape(source, key)


def _apply_overrides(config: D2VLMConfig, overrides: Mapping[str, Any]) -> D2VLMConfig:
    """Dotted overrides: ``{"video.vision.num_heads": 2, "llm.param_dtype": "bfloat16"}``."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")

        def rec(obj, parts):
            if not dataclasses.is_dataclass(obj) or parts[0] not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"config override {dotted!r}: no field {parts[0]!r} in {type(obj).__name__}")
            if len(parts) == 1:
                return dataclasses.replace(obj, **{parts[0]: value})
            return dataclasses.replace(obj, **{parts[0]: rec(getattr(obj, parts[0]), parts[1:])})

        config = rec(config, parts)
    return config


def config_from_authors(hf_config: Mapping[str, Any], source: Mapping[str, Any], *, lora_rank: int = 0,
                        lora_alpha: float = 256.0, lora_dropout: float = 0.0, param_dtype: str = "float32",
                        dtype: str = "float32", overrides: Mapping[str, Any] | None = None) -> D2VLMConfig:
    """A :class:`D2VLMConfig` from the authors' ``config.json`` and the checkpoint's tensor shapes.

    Raises :class:`CheckpointError` for a checkpoint that is not a D²VLM evidence model
    (``use_evidence`` false, ``mm_projector`` not ``qformer``, ``bi_attention`` false, ...).
    """
    where = "config.json"
    if not hf_config.get("use_evidence", False):
        raise CheckpointError(f"{where}: use_evidence is not true: not a D²VLM checkpoint (an E.T. Chat base "
                              "model has no evi_head)")
    for field, want in (("mm_projector", "qformer"), ("vision_output_token", "patch"), ("vision_tower", "eva_vit")):
        if hf_config.get(field, want) != want:
            raise CheckpointError(f"{where}: {field}={hf_config[field]!r}; only {want!r} is supported")
    if not hf_config.get("bi_attention", True):
        raise CheckpointError(f"{where}: bi_attention=false (causal frame tokens) is not supported: d2vlm-jax "
                              "always attends bidirectionally inside the frame block")
    if hf_config.get("use_time_tag"):
        raise CheckpointError(f"{where}: use_time_tag=true is not supported")
    # "etchat_phi3" / "d2vlm_phi3" -> "phi3" (the authors also store language_model)
    family = hf_config.get("language_model") or hf_config.get("model_type", "").rsplit("_", 1)[-1]
    llm = config_from_hf({**hf_config, "model_type": family}, lora_rank=lora_rank, lora_alpha=float(lora_alpha),
                         lora_dropout=float(lora_dropout), param_dtype=param_dtype, dtype=dtype)
    rows = _need(source, "model.embed_tokens.weight")[0]
    if rows != llm.vocab_size:
        raise CheckpointError(f"vocab mismatch: config.json vocab_size={llm.vocab_size} but model.embed_tokens.weight "
                              f"has {rows} rows")

    # Vision tower (EVA-ViT-g; sizes from the tensors, head dim 88 as in the authors' code).
    p = VISION_PREFIX
    width, _, patch, _ = _need(source, f"{p}.patch_embed.proj.weight")
    grid = math.isqrt(_need(source, f"{p}.pos_embed")[1] - 1)
    idx = int(hf_config.get("vision_output_layer", -2))
    run = idx + 1 if idx >= 0 else EVA_PRETRAINED_DEPTH + idx + 1
    if width % EVA_HEAD_DIM:
        raise CheckpointError(f"vision width {width} is not a multiple of the EVA head dim {EVA_HEAD_DIM}; "
                              "pass overrides={'video.vision.num_heads': ...}")
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width, depth=max(run, EVA_PRETRAINED_DEPTH),
                          num_heads=width // EVA_HEAD_DIM, mlp_dim=_need(source, f"{p}.blocks.0.mlp.fc1.weight")[0],
                          output_layer=run, dtype=dtype, param_dtype=param_dtype)

    # Q-Former (bert-base sizes from the tensors, head dim 64).
    q = QFORMER_PREFIX
    vocab, hidden = _need(source, f"{q}.embeddings.word_embeddings.weight")
    layers = _count_indices(source, rf"{re.escape(q)}\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
    cross = _count_indices(source, rf"{re.escape(q)}\.encoder\.layer\.(\d+)\.crossattention\.self\.query\.weight")
    n_layers = max(layers, default=-1) + 1
    freq = next((f for f in range(1, n_layers + 1) if cross == {i for i in range(n_layers) if i % f == 0}), None)
    if freq is None:
        raise CheckpointError(f"Q-Former cross-attention on layers {sorted(cross)} is not every k-th layer from 0")
    enc_width = _need(source, f"{q}.encoder.layer.0.crossattention.self.key.weight")[1]
    if hidden % BERT_HEAD_DIM:
        raise CheckpointError(f"Q-Former hidden {hidden} is not a multiple of the BERT head dim {BERT_HEAD_DIM}; "
                              "pass overrides={'video.qformer.num_heads': ...}")
    qformer = QFormerConfig(hidden_size=hidden, num_layers=n_layers, num_heads=hidden // BERT_HEAD_DIM,
                            intermediate_size=_need(source, f"{q}.encoder.layer.0.intermediate_query.dense.weight")[0],
                            vocab_size=vocab,
                            max_position_embeddings=_need(source, f"{q}.embeddings.position_embeddings.weight")[0],
                            num_queries=_need(source, "model.qformer_query")[-2], cross_attention_frequency=freq,
                            encoder_width=enc_width, dtype=dtype, param_dtype=param_dtype)
    compressor = CompressorConfig(query_dim=hidden, vision_dim=width,
                                  out_dim=_need(source, "model.qformer_v_proj.1.weight")[0], dtype=dtype,
                                  param_dtype=param_dtype)
    config = D2VLMConfig(llm=llm, video=VideoEncoderConfig(vision, qformer, compressor),
                         k_evi=int(hf_config.get("hidden_add_index", AUTHORS_K_EVI)),
                         alpha=float(hf_config.get("alpha", 2.0)))
    return _apply_overrides(config, overrides or {})


def model_config_to_dict(config: D2VLMConfig) -> dict:
    """JSON-able dict of a :class:`D2VLMConfig` (sharding rules left out: a run-time choice)."""
    d = dataclasses.asdict(config)
    d["llm"].pop("sharding_rules", None)
    return d


def model_config_from_dict(d: Mapping[str, Any]) -> D2VLMConfig:
    d = dict(d)
    video = dict(d.pop("video"))
    vcfg = VideoEncoderConfig(VisionConfig(**video["vision"]), QFormerConfig(**video["qformer"]),
                              CompressorConfig(**video["compressor"]))
    return D2VLMConfig(llm=DecoderConfig.from_dict(d.pop("llm")), video=vcfg, **d)


def save_model_config(directory: str | os.PathLike, config: D2VLMConfig) -> str:
    path = os.path.join(os.fspath(directory), MODEL_CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(model_config_to_dict(config), f, indent=1)
    return path


def load_model_config(directory: str | os.PathLike, **overrides: Any) -> D2VLMConfig:
    """The :class:`D2VLMConfig` written next to imported params (``d2vlm_config.json``);
    ``overrides`` are dotted fields, e.g. ``**{"llm.dtype": "bfloat16"}``."""
    path = os.path.join(os.fspath(directory), MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {MODEL_CONFIG_FILE} (not a d2vlm-jax checkpoint directory)")
    return _apply_overrides(model_config_from_dict(read_json(path)), overrides)


# ----------------------------------------------------------------------------- tokenizer


def check_tokenizer(directory: str, hf_config: Mapping[str, Any], vocab_rows: int) -> dict:
    """Checks the tokenizer files against the model: every id < ``vocab_rows`` and ``<evi>`` /
    ``</evi>`` present with the ids of ``config.json``. Returns a summary for the report.

    ``tokenizer.json`` (what the data layer loads) is read with HF ``tokenizers``; a
    slow-only tokenizer (``tokenizer.model`` + ``added_tokens.json``) is checked through its
    added tokens only.
    """
    from tokenizers import Tokenizer

    tok_json = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tok_json):
        tok = Tokenizer.from_file(tok_json)
        size = tok.get_vocab_size(with_added_tokens=True)
        ids = {t: tok.token_to_id(t) for t in ("<evi>", "</evi>")}
        kind = "tokenizer.json"
    else:
        added = {}
        for name in ("added_tokens.json",):
            if os.path.isfile(os.path.join(directory, name)):
                added.update(read_json(os.path.join(directory, name)))
        tc = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(tc):
            for i, entry in read_json(tc).get("added_tokens_decoder", {}).items():
                added.setdefault(entry["content"], int(i))
        if not added:
            raise CheckpointError(f"{directory}: no tokenizer (tokenizer.json, or tokenizer.model with "
                                  "added_tokens.json/tokenizer_config.json)")
        size = max(added.values()) + 1
        ids = {t: added.get(t) for t in ("<evi>", "</evi>")}
        kind = "added tokens only (no tokenizer.json: the data layer needs one)"
        log.warning("%s: %s", directory, kind)
    if size > vocab_rows:
        raise CheckpointError(f"vocab mismatch: tokenizer in {directory} has {size} ids but the model's "
                              f"embed_tokens/lm_head have {vocab_rows} rows")
    for token, field in (("<evi>", "evidence_token_id"), ("</evi>", "evidence_end_token_id")):
        if ids[token] is None:
            raise CheckpointError(f"tokenizer in {directory} lacks the added token {token!r}")
        if field in hf_config and int(hf_config[field]) != ids[token]:
            raise CheckpointError(f"config.json {field}={hf_config[field]} but the tokenizer gives {token!r} "
                                  f"id {ids[token]}")
    return {"kind": kind, "size": size, "model_vocab_rows": vocab_rows, "evi_id": ids["<evi>"],
            "evi_end_id": ids["</evi>"]}


# ----------------------------------------------------------------------------- import


def abstract_params(config: D2VLMConfig) -> tuple[dict, Any]:
    """(``params`` tree of ShapeDtypeStructs, boxed abstract variables) without allocating."""
    from d2vlm_jax.testing import random_batch

    batch = random_batch(config, batch=1, frames=2, qformer_len=3, prefix=8, response=8, evidence=2, events=1,
                         question_evidence=1)
    boxed = abstract_variables(config, batch)
    return sharding.unbox(boxed)["params"], boxed


def load_authors_params(ckpt: AuthorsCheckpoint, config: D2VLMConfig, *, lora: str = "keep",
                        place: Callable[[Path, np.ndarray], Any] | None = None,
                        mesh: jax.sharding.Mesh | None = None) -> tuple[dict, dict[str, str]]:
    """Converts the checkpoint's tensors one at a time into the ``params`` tree.

    Args:
      lora: ``"keep"`` (adapters become ``lora_a``/``lora_b``; needs ``config.llm.lora_rank``
        = the adapter's ``r``) or ``"merge"`` (folded into the base kernels as they are read).
      place / mesh: where each converted tensor goes (``mesh``: straight onto the devices
        with the leaf's NamedSharding from ``sharding.shardings_for``; default: a jax array
        on the host CPU device, which Orbax then saves without another full copy).
    Returns:
      ``(params, ignored)`` with ``ignored = {key: reason}`` for every checkpoint key not used.
    """
    if lora not in ("keep", "merge"):
        raise ValueError(f"lora must be 'keep' or 'merge', got {lora!r}")
    target, boxed = abstract_params(config)
    if mesh is not None:
        place = sharded_placer(sharding.shardings_for(boxed, mesh, config.llm.sharding_rules)["params"])
    elif place is None:
        place = host_placer()
    source = ckpt.source
    adapters = ckpt.has_adapters
    if adapters and lora == "merge":
        acfg = ckpt.adapter_config
        source = LoraMergingSource(source, float(acfg["lora_alpha"]) / int(acfg["r"]))
    elif adapters:
        acfg = ckpt.adapter_config
        if int(acfg["r"]) != config.llm.lora_rank or sorted(acfg["target_modules"]) != sorted(config.llm.lora_targets):
            raise CheckpointError(f"adapter r={acfg['r']} targets={acfg['target_modules']} do not fit the model "
                                  f"(lora_rank={config.llm.lora_rank}, targets={list(config.llm.lora_targets)}); "
                                  "use lora='merge'")
    elif config.llm.lora_rank > 0:
        raise CheckpointError(f"{ckpt.path}: the model config has lora_rank={config.llm.lora_rank} but the "
                              "checkpoint has no adapters")
    rules = d2vlm_rules(config, adapters=adapters and lora == "keep")
    consumed = getattr(source, "consumed", set())
    params, unused = load_with_rules(
        source, rules, target, dtype=_np_dtype(config.llm.param_dtype), place=place,
        ignore_unused=lambda k: k in consumed or ignored_reason(k, config) is not None, stacks=config.layer_stacks)
    ignored = {k: ignored_reason(k, config) for k in unused if k not in consumed}
    return params, ignored


@dataclasses.dataclass
class ImportResult:
    config: D2VLMConfig
    params: dict
    ignored: dict[str, str]
    report: dict


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                      base: str | os.PathLike | None = None, lora: str = "keep", param_dtype: str = "float32",
                      overrides: Mapping[str, Any] | None = None, mesh: jax.sharding.Mesh | None = None,
                      check_tokenizer_files: bool = True) -> ImportResult:
    """Authors' checkpoint directory -> d2vlm-jax (config + params [+ files in ``dst``]).

    Writes, when ``dst`` is given: ``dst/params`` (Orbax), ``d2vlm_config.json``,
    ``authors_config.json``, ``import_report.json`` and the tokenizer files.
    """
    ckpt = open_authors_checkpoint(src, base)
    acfg = ckpt.adapter_config or {}
    keep = ckpt.has_adapters and lora == "keep"
    lora_fields = dict(lora_rank=int(acfg["r"]), lora_alpha=float(acfg["lora_alpha"]),
                       lora_dropout=float(acfg.get("lora_dropout", 0.0))) if keep else {}
    config = config_from_authors(ckpt.hf_config, ckpt.source, param_dtype=param_dtype, overrides=overrides,
                                 **lora_fields)
    tok_report = None
    if check_tokenizer_files:
        tok_report = check_tokenizer(ckpt.path, ckpt.hf_config, config.llm.vocab_size)
    params, ignored = load_authors_params(ckpt, config, lora=lora, mesh=mesh)
    report = {"src": os.fspath(src), "form": ckpt.form, "base": ckpt.base_path, "lora": lora if ckpt.has_adapters
              else "none", "ignored": ignored, "shadowed": getattr(ckpt.source, "shadowed", []),
              "tokenizer": tok_report,
              "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
    for key, reason in ignored.items():
        log.info("ignored %s: %s", key, reason)
    if dst is not None:
        dst = os.fspath(dst)
        os.makedirs(dst, exist_ok=True)
        save_params(dst, params)
        save_model_config(dst, config)
        with open(os.path.join(dst, AUTHORS_CONFIG_FILE), "w") as f:
            json.dump(ckpt.hf_config, f, indent=1)
        with open(os.path.join(dst, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(ckpt.path, name)):
                shutil.copy2(os.path.join(ckpt.path, name), os.path.join(dst, name))
    return ImportResult(config, params, ignored, report)


def host_placer() -> Callable[[Path, np.ndarray], jax.Array]:
    """``place`` callback putting each converted tensor into a jax array on the host CPU
    device (no copy for aligned numpy buffers)."""
    cpu = jax.devices("cpu")[0]
    return lambda path, value: jax.device_put(value, cpu)


def save_params(directory: str | os.PathLike, params: Mapping, *, concurrent_gb: int = 1) -> str:
    """Writes ``params`` (nested dict of arrays) with Orbax to ``directory/params``.

    Synchronous, at most ``concurrent_gb`` GiB in flight: with jax-array leaves the save adds
    about that much to the params' own memory (numpy leaves are first wrapped as host jax
    arrays: Orbax would otherwise stage copies of the whole tree).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(os.fspath(directory), PARAMS_DIR))
    if os.path.exists(path):
        shutil.rmtree(path)
    cpu = jax.devices("cpu")[0]
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x), cpu), params)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, int(concurrent_gb))))
    ckptr.save(path, args=ocp.args.StandardSave(params))
    return path


def load_params(directory: str | os.PathLike, target: Any | None = None) -> dict:
    """Reads ``directory/params``; ``target`` (a tree of ``jax.ShapeDtypeStruct`` with shardings)
    restores straight onto devices, else numpy arrays."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(os.fspath(directory), PARAMS_DIR))
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: no Orbax params directory {PARAMS_DIR}/")
    return ocp.StandardCheckpointer().restore(path, target) if target is not None else \
        ocp.StandardCheckpointer().restore(path)


# ----------------------------------------------------------------------------- export


def is_authors_trainable(key: str) -> bool:
    """Keys the authors train besides LoRA (what their ``pytorch_model.safetensors`` holds):
    embeddings, LM head, grounding heads, the Q-Former's attention and its non-BERT parts."""
    if any(k in key for k in ("embed_tokens", "lm_head", "frm_head", "evi_head")):
        return True
    return "qformer" in key and ("attention" in key or "qformer_bert" not in key)


def authors_config_json(config: D2VLMConfig, template: Mapping[str, Any] | None = None,
                        tokenizer_ids: Mapping[str, int] | None = None, torch_dtype: str = "float32") -> dict:
    """``config.json`` in the authors' format: ``template`` (the imported ``config.json``) with
    every field our model defines rewritten from ``config``."""
    llm, vision = config.llm, config.video.vision
    out = dict(template or {})
    out.update({
        "model_type": FAMILY_MODEL_TYPE[llm.family], "architectures": [FAMILY_ARCH[llm.family]],
        "language_model": llm.family, "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
        "rope_theta": llm.rope_theta, "rms_norm_eps": llm.rms_norm_eps,
        "tie_word_embeddings": llm.tie_word_embeddings, "torch_dtype": torch_dtype,
        "mm_projector": "qformer", "vision_tower": "eva_vit", "vision_output_token": "patch",
        "bi_attention": True, "use_evidence": True, "use_matching": False, "alpha": config.alpha,
        "load_base_models": False,
    })
    if llm.head_dim:
        out["head_dim"] = llm.head_dim
    idx = int(out.get("vision_output_layer", -2))
    if (idx + 1 if idx >= 0 else EVA_PRETRAINED_DEPTH + idx + 1) != vision.num_blocks_run:
        out["vision_output_layer"] = vision.num_blocks_run - 1
    if config.k_evi != AUTHORS_K_EVI or "hidden_add_index" in out:
        out["hidden_add_index"] = config.k_evi
    if tokenizer_ids:
        out["evidence_token_id"], out["evidence_end_token_id"] = tokenizer_ids["<evi>"], tokenizer_ids["</evi>"]
    return out


class _ShardWriter:
    """Writes ``key -> array`` into ``prefix-0000i.safetensors`` shards of at most
    ``max_shard_bytes`` (one tensor per shard when larger), plus the HF index JSON."""

    def __init__(self, directory: str, stem: str, max_shard_bytes: int):
        self.directory, self.stem, self.max = directory, stem, max_shard_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, key: str, value: np.ndarray) -> None:
        if self.pending and self.pending_bytes + value.nbytes > self.max:
            self.flush()
        self.pending[key] = value
        self.pending_bytes += value.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.stem}-tmp{len(self.files):05d}.safetensors"
        write_safetensors(os.path.join(self.directory, name), self.pending, {"format": "pt"})
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.files)
        final = {}
        for i, name in enumerate(self.files):
            new = f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, name), os.path.join(self.directory, new))
            final[name] = new
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        with open(os.path.join(self.directory, f"{self.stem}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
        return sorted(final.values())


def _np_dtype(name: str):
    import ml_dtypes
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def export_params_authors(params: Mapping, config: D2VLMConfig, dst: str, *, lora: str = "merged",
                          dtype: str = "float32", template: Mapping[str, Any] | None = None,
                          tokenizer_dir: str | None = None, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Writes ``params`` in the authors' layout into ``dst`` (see :func:`export_checkpoint`)."""
    from d2vlm_jax.models import lora as lora_lib

    if lora not in ("merged", "adapter"):
        raise ValueError(f"lora must be 'merged' or 'adapter', got {lora!r}")
    os.makedirs(dst, exist_ok=True)
    out_dtype, llm = _np_dtype(dtype), config.llm
    has_lora = llm.lora_rank > 0
    if lora == "adapter" and not has_lora:
        raise CheckpointError("export lora='adapter': the model has no LoRA adapters (lora_rank=0); use 'merged'")
    if lora == "merged" and has_lora:
        params = {**params, "llm": jax.tree.map(np.asarray, lora_lib.merge_lora(params["llm"], llm.lora_alpha,
                                                                               llm.lora_rank))}
    base_rules = d2vlm_rules(config, adapters=False)
    tok_ids = None
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        tok_ids = {t: tok.token_to_id(t) for t in ("<evi>", "</evi>")}
        tok_ids = tok_ids if None not in tok_ids.values() else None
    cfg_json = authors_config_json(config, template, tok_ids, dtype)

    def tensor(rule: Rule) -> np.ndarray:
        value = get_param(params, rule.flax_path, config.layer_stacks)
        return np.ascontiguousarray(rule.to_source(np.asarray(value)).astype(out_dtype))

    def copy_tokenizer(to: str) -> None:
        for name in TOKENIZER_FILES:
            if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(to, name))

    written = []
    if lora == "merged":
        writer = _ShardWriter(dst, "model", max_shard_bytes)
        for rule in base_rules:
            writer.add(rule.source_key, tensor(rule))
        written = writer.close()
        cfg_json.pop("model_name_or_path", None)
    else:
        base_dir = os.path.join(dst, "base")
        os.makedirs(base_dir, exist_ok=True)
        writer = _ShardWriter(base_dir, "model", max_shard_bytes)
        partial = {}
        for rule in base_rules:
            value = tensor(rule)
            writer.add(rule.source_key, value)
            if is_authors_trainable(rule.source_key):
                partial[PEFT_PREFIX + rule.source_key] = value
        written = [os.path.join("base", f) for f in writer.close()]
        write_safetensors(os.path.join(dst, PARTIAL_FILE), partial, {"format": "pt"})
        adapters = {PEFT_PREFIX + r.source_key: tensor(r) for r in lora_rules(llm)}
        write_safetensors(os.path.join(dst, ADAPTER_FILE), adapters, {"format": "pt"})
        with open(os.path.join(dst, ADAPTER_CONFIG_FILE), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": llm.lora_rank,
                       "lora_alpha": llm.lora_alpha, "lora_dropout": llm.lora_dropout, "bias": "none",
                       "target_modules": list(llm.lora_targets), "base_model_name_or_path": os.path.abspath(base_dir),
                       "use_rslora": False, "use_dora": False}, f, indent=1)
        with open(os.path.join(base_dir, CONFIG_FILE), "w") as f:
            json.dump({k: v for k, v in cfg_json.items() if k != "model_name_or_path"}, f, indent=1)
        cfg_json["model_name_or_path"] = os.path.abspath(base_dir)
        written += [PARTIAL_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE]
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(cfg_json, f, indent=1)
    copy_tokenizer(dst)
    return written + [CONFIG_FILE]


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, lora: str = "merged",
                      dtype: str = "float32", max_shard_bytes: int = 2 << 30) -> list[str]:
    """d2vlm-jax directory (``params/`` + ``d2vlm_config.json``) -> the authors' layout.

    ``lora="merged"``: ``model*.safetensors`` + index + ``config.json`` (adapters folded
    into the base kernels: the authors' ``save_full_model`` form). ``lora="adapter"``: the
    split form: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT names) +
    ``pytorch_model.safetensors`` (trained non-LoRA tensors) + ``config.json`` whose
    ``model_name_or_path`` is ``dst/base`` (all base tensors, adapters not merged).
    Tokenizer files are copied. Returns the files written (relative to ``dst``).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    config = load_model_config(src)
    params = load_params(src)
    template_path = os.path.join(src, AUTHORS_CONFIG_FILE)
    template = read_json(template_path) if os.path.isfile(template_path) else None
    return export_params_authors(params, config, dst, lora=lora, dtype=dtype, template=template,
                                 tokenizer_dir=src, max_shard_bytes=max_shard_bytes)
