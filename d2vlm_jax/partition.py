"""Trainable / frozen parameters from one table of path patterns (SPEC §1.6).

Paths are ``'/'``-joined parameter names (``'llm/layers_3/attn/qkv_proj/lora_a'``; with
scanned layers one path covers every layer: ``'llm/layers/attn/qkv_proj/lora_a'``, so a
pattern naming single layers needs ``scan_layers`` off). The first pattern that fully matches
decides; a path matching nothing is frozen. The table lives in the
config (``config.trainable``) so an experiment can change it; :data:`D2VLM_TRAINABLE` is the
paper's partition. Frozen parameters are passed to the loss as constants: they get no
gradient computation and no optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from flax import traverse_util

from d2vlm_jax.models.video_encoder import VIDEO_ENCODER_TRAINABLE_PATTERNS

D2VLM_TRAINABLE: tuple[tuple[str, bool], ...] = (
    (r"llm/layers(_\d+)?/attn/\w+/lora_[ab]", True),  # LoRA adapters (layers unrolled or scanned)
    (r"llm/embed_tokens/.*", True),                 # token embeddings (incl. <evi>, </evi>)
    (r"llm/lm_head/.*", True),
    (r"llm/.*", False),                             # the LLM's base weights
    (r"(frm_head|evi_head)/.*", True),
) + tuple((f"video/{pattern}", trainable) for pattern, trainable in VIDEO_ENCODER_TRAINABLE_PATTERNS)


def normalize(patterns: Iterable[Sequence[Any]] | None) -> tuple[tuple[str, bool], ...]:
    if patterns is None:
        return D2VLM_TRAINABLE
    out = []
    for entry in patterns:
        if len(entry) != 2:
            raise ValueError(f"trainable pattern must be (regex, bool), got {entry!r}")
        pattern, trainable = entry
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"trainable pattern {pattern!r} is not a valid regex: {e}") from e
        out.append((str(pattern), bool(trainable)))
    return tuple(out)


def is_trainable(path: str, patterns: Sequence[tuple[str, bool]]) -> bool:
    for pattern, trainable in patterns:
        if re.fullmatch(pattern, path):
            return trainable
    return False


def split(params: Mapping, patterns: Sequence[tuple[str, bool]]) -> tuple[dict, dict]:
    """``params -> (trainable, frozen)``: two nested dicts that together hold every leaf."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return (traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    """The inverse of :func:`split`."""
    flat = traverse_util.flatten_dict(frozen, sep="/")
    overlap = set(flat) & set(traverse_util.flatten_dict(trainable, sep="/"))
    if overlap:
        raise ValueError(f"parameters both trainable and frozen: {sorted(overlap)[:5]}")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def summary(params: Mapping, patterns: Sequence[tuple[str, bool]]) -> dict[str, int]:
    """Parameter counts: ``{'trainable': n, 'frozen': m}``."""
    flat = traverse_util.flatten_dict(params, sep="/")
    counts = {"trainable": 0, "frozen": 0}
    for k, v in flat.items():
        counts["trainable" if is_trainable(k, patterns) else "frozen"] += int(getattr(v, "size", 0))
    return counts
