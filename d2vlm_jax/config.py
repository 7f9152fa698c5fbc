"""Experiment config (ml_collections) -> typed, validated objects.

The experiment files in ``configs/`` return a ``ConfigDict``; everything below turns it into
the frozen dataclasses the library uses and fails early, naming the field, when something
cannot work (unknown fields, impossible mesh, batch not divisible by the data axes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from d2vlm_jax import losses, partition, sharding
from d2vlm_jax.models.compressor import CompressorConfig
from d2vlm_jax.models.d2vlm import D2VLMConfig
from d2vlm_jax.models.decoder import DecoderConfig
from d2vlm_jax.models.qformer import QFormerConfig
from d2vlm_jax.models.video_encoder import VideoEncoderConfig
from d2vlm_jax.models.vision import VisionConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _to_dict(x: Any) -> dict:
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    return dict(x)


def _dataclass_from(cls, values: Mapping[str, Any], where: str, **extra):
    values = dict(_to_dict(values), **extra)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                 qformer_vocab_size: int | None = None) -> D2VLMConfig:
    """``config.model`` -> :class:`D2VLMConfig`. The tokenizers' vocabulary sizes, when
    given, override ``model.llm.vocab_size`` / ``model.video.qformer.vocab_size`` if those are 0
    (and must agree with them otherwise)."""
    m = config.model
    rules = sharding.rules_from_config(config.get("sharding_rules"))
    llm_values = _to_dict(m.llm)
    vision_values = _to_dict(m.video.vision)
    qformer_values = _to_dict(m.video.qformer)
    scan = m.get("scan_layers")  # the one switch for the decoder, the vision tower and the Q-Former
    if scan is not None:
        for values, where in ((llm_values, "llm"), (vision_values, "video.vision"), (qformer_values, "video.qformer")):
            if "scan_layers" in values and bool(values["scan_layers"]) != bool(scan):
                raise ConfigError(f"config.model.{where}.scan_layers={values['scan_layers']} contradicts "
                                  f"config.model.scan_layers={scan}; set one of them")
            values["scan_layers"] = bool(scan)
    for values, size, where in ((llm_values, vocab_size, "config.model.llm.vocab_size"),
                                (qformer_values, qformer_vocab_size, "config.model.video.qformer.vocab_size")):
        if size is None:
            continue
        if not values.get("vocab_size"):
            values["vocab_size"] = int(size)
        elif int(values["vocab_size"]) < int(size):
            raise ConfigError(f"{where}={values['vocab_size']} is smaller than the tokenizer's {size} tokens")
    llm = _dataclass_from(DecoderConfig, llm_values, "config.model.llm", sharding_rules=rules)
    video = VideoEncoderConfig(
        vision=_dataclass_from(VisionConfig, vision_values, "config.model.video.vision"),
        qformer=_dataclass_from(QFormerConfig, qformer_values, "config.model.video.qformer"),
        compressor=_dataclass_from(CompressorConfig, m.video.compressor, "config.model.video.compressor"),
    )
    top = {k: v for k, v in _to_dict(m).items() if k not in ("llm", "video", "scan_layers")}
    return _dataclass_from(D2VLMConfig, top, "config.model", llm=llm, video=video)


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    return _dataclass_from(losses.LossConfig, config.loss, "config.loss")


def trainable_patterns(config: ml_collections.ConfigDict):
    try:
        return partition.normalize(config.get("trainable"))
    except ValueError as e:
        raise ConfigError(f"config.trainable: {e}") from e


def check_mesh_and_batch(config: ml_collections.ConfigDict, num_devices: int, process_count: int,
                         batch_size: int, micro_batches: int, where: str) -> dict[str, int]:
    """Resolves the mesh sizes and checks the batch fits them; returns the mesh sizes."""
    sizes = _to_dict(config.mesh)
    try:
        mesh_sizes = sharding.resolve_mesh_shape(sizes, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh {sizes} is impossible on {num_devices} devices: {e}") from e
    data_parallel = mesh_sizes["data"] * mesh_sizes["fsdp"]
    if batch_size % micro_batches:
        raise ConfigError(f"{where}.batch_size={batch_size} is not divisible by {where}.micro_batches={micro_batches}")
    micro = batch_size // micro_batches
    if micro % data_parallel:
        raise ConfigError(f"{where}: micro-batch of {micro} rows (batch_size {batch_size} / micro_batches "
                          f"{micro_batches}) is not divisible by the data axes data*fsdp = {data_parallel}")
    if batch_size % process_count:
        raise ConfigError(f"{where}.batch_size={batch_size} is not divisible by the {process_count} processes")
    return mesh_sizes


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1) -> list[str]:
    """Checks an experiment config without touching devices, data or checkpoints: the stages,
    the model / loss / trainable tables, and (with ``num_devices``) every stage's mesh and batch.
    Returns one summary line per item checked; raises :class:`ConfigError` naming the field.
    A vocabulary size of 0 (taken from the tokenizer at training time) is accepted."""
    lines = []
    stages = tuple(config.get("stages", ()))
    if not stages or any(s not in ("sft", "fpo") for s in stages):
        raise ConfigError(f"config.stages={stages!r}: list 'sft' and/or 'fpo'")
    m = model_config(config, vocab_size=config.model.llm.vocab_size or 1,
                     qformer_vocab_size=config.model.video.qformer.vocab_size or 1)
    lines.append(f"model: {m.llm.family} {m.llm.num_layers} layers x {m.llm.hidden_size}, vision "
                 f"{m.video.vision.num_blocks_run} blocks x {m.video.vision.width}, Q-Former "
                 f"{m.video.qformer.num_layers} layers"
                 + "".join(f"; {name} scanned" for name, on in (("decoder", m.llm.scan_layers),
                                                                ("vision", m.video.vision.scan_layers),
                                                                ("Q-Former", m.video.qformer.scan_layers)) if on))
    lines.append(f"loss: {loss_config(config)}")
    lines.append(f"trainable table: {len(trainable_patterns(config))} patterns")
    for stage in stages:
        if stage not in config:
            raise ConfigError(f"config.stages lists {stage!r} but the config has no {stage!r} section")
        sc = config[stage]
        if sc.micro_batches < 1 or sc.batch_size % sc.micro_batches:
            raise ConfigError(f"config.{stage}.batch_size={sc.batch_size} is not divisible by "
                              f"config.{stage}.micro_batches={sc.micro_batches}")
        line = f"{stage}: batch {sc.batch_size} as {sc.micro_batches} micro-batch(es)"
        if num_devices is not None:
            mesh = check_mesh_and_batch(config, num_devices, process_count, sc.batch_size, sc.micro_batches,
                                        f"config.{stage}")
            line += f", mesh {mesh} on {num_devices} devices"
        lines.append(line)
    return lines
