"""Named decoding presets and the authors' output text (``launch/evaluate.py --decoding``).

``authors`` reproduces how the authors decode E.T. Bench (their
``infer_etbench_decouple.py`` on HF ``transformers`` 4.44 ``generate``):

* sampling (``do_sample=True``) at temperature 0.2; HF's generation defaults add top-k 50
  (``GenerationConfig.top_k``; Phi-3's ``generation_config.json`` does not override it) and
  leave top-p at 1; the order is repetition penalty, temperature, top-k;
* ``max_new_tokens=2048``; a row stops at any id of the generation config's
  ``eos_token_id`` (Phi-3: ``<|endoftext|>``, ``<|assistant|>``, ``<|end|>``) or at the
  ``<|end|>`` keyword criterion, the stop token being part of the output;
* a repetition penalty of 1.2 for the tasks ``rar``, ``eca`` and ``rvq`` only, applied to
  every token id in HF's ``input_ids`` — the prompt's text tokens and the generated ones
  (frame slots are not tokens: their one placeholder is -200) — except ``<evi>``;
* the model in float16, and the interval rule's ``find_and_merge``: ties between run means
  span from the first tied run to the last, in the dtype of the grounding curve.

``greedy`` is the project's original setting: argmax, no penalty, the first tied run, exact
arithmetic, a stop at ``<|end|>`` only.

:func:`authors_text` renders a generated row the way the authors' ``detokenize`` does, so
that their scoring scripts read it unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from d2vlm_jax.inference.decode import DecodeConfig
from d2vlm_jax.models.d2vlm import D2VLMConfig

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
AUTHORS_STOP_TEXT = "<|end|>"                  # the Phi-3 conversation separator they strip


@dataclasses.dataclass(frozen=True)
class DecodingPreset:
    """A named set of decoding settings (see the module docstring).

    max_new_tokens: None = the caller's default (the training config's, else 256).
    penalty_tasks: tasks that get ``repetition_penalty`` (every other task: 1.0).
    stop_tokens: token strings ending a row besides ``<|end|>`` (absent ones are ignored).
    dtype: the model's compute dtype the preset evaluates in (``--dtype`` overrides it).
    interval_arithmetic: ``"dtype"`` = the grounding curve's dtype (float16 -> the float16
      rule, float32 -> exact), or an ``evaluation.intervals`` arithmetic name.
    """
    name: str
    summary: str
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int | None
    repetition_penalty: float
    penalty_tasks: tuple[str, ...]
    penalize_prompt: bool
    exempt_evidence_token: bool
    stop_tokens: tuple[str, ...]
    interval_tie_rule: str
    interval_arithmetic: str
    dtype: str

    def penalties(self, tasks: Sequence[str]) -> list[float]:
        """The repetition penalty of each row, from its task."""
        return [self.repetition_penalty if task in self.penalty_tasks else 1.0 for task in tasks]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, DecodingPreset] = {
    "authors": DecodingPreset(
        name="authors", summary="the authors' E.T. Bench decoding: sampling T=0.2, top-k 50, 2048 tokens, "
                                "penalty 1.2 on rar/eca/rvq over prompt + generated tokens (<evi> exempt), "
                                "float16, span tie rule",
        temperature=0.2, top_k=50, top_p=1.0, max_new_tokens=2048, repetition_penalty=1.2,
        penalty_tasks=("rar", "eca", "rvq"), penalize_prompt=True, exempt_evidence_token=True,
        stop_tokens=("<|endoftext|>", "<|assistant|>", "<|end|>"), interval_tie_rule="span",
        interval_arithmetic="dtype", dtype="float16"),
    "greedy": DecodingPreset(
        name="greedy", summary="the project's default: greedy, no penalty, first tied run, exact arithmetic",
        temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=None, repetition_penalty=1.0, penalty_tasks=(),
        penalize_prompt=False, exempt_evidence_token=False, stop_tokens=("<|end|>",), interval_tie_rule="first",
        interval_arithmetic="exact", dtype="float32"),
}


def get_preset(name: str) -> DecodingPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown decoding preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def interval_arithmetic(preset: DecodingPreset, dtype: str) -> str:
    """The interval rule's arithmetic for a compute dtype (``"dtype"`` presets)."""
    if preset.interval_arithmetic != "dtype":
        return preset.interval_arithmetic
    return {"float16": "float16", "bfloat16": "bfloat16", "float32": "exact"}[dtype]


def with_compute_dtype(config: D2VLMConfig, dtype: str) -> D2VLMConfig:
    """The model config computing in ``dtype`` everywhere (LLM, grounding heads, vision
    tower, Q-Former, compressor); parameters keep their stored dtype and are cast per layer,
    as the authors' ``torch_dtype=float16`` weights are."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    v = config.video
    video = dataclasses.replace(v, vision=dataclasses.replace(v.vision, dtype=dtype),
                                qformer=dataclasses.replace(v.qformer, dtype=dtype),
                                compressor=dataclasses.replace(v.compressor, dtype=dtype))
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, dtype=dtype), video=video)


def decode_config(preset: DecodingPreset, tokenizer, *, max_new_tokens: int, dtype: str,
                  return_probabilities: bool = False) -> DecodeConfig:
    """The :class:`DecodeConfig` of ``preset`` for ``tokenizer`` (a ``TextTokenizer``)."""
    stops = []
    for token in preset.stop_tokens:
        try:
            stops.append(tokenizer.token_id(token))
        except ValueError:
            continue                          # e.g. a tokenizer without <|endoftext|>
    return DecodeConfig(
        max_new_tokens=max_new_tokens, evi_token_id=tokenizer.evi_id, end_token_id=tokenizer.end_id,
        pad_token_id=tokenizer.pad_id, temperature=preset.temperature, top_k=preset.top_k, top_p=preset.top_p,
        repetition_penalty=1.0, penalize_prompt=preset.penalize_prompt,
        penalty_exempt_ids=(tokenizer.evi_id,) if preset.exempt_evidence_token else (),
        stop_token_ids=tuple(stops), interval_tie_rule=preset.interval_tie_rule,
        interval_arithmetic=interval_arithmetic(preset, dtype), return_probabilities=return_probabilities)


def format_evidence(first: int, last: int) -> str:
    """One ``<evi>`` as the authors' ``format_intervals`` writes it: the *frame indices* of
    the selected interval (seconds at their 1 fps sampling), a trailing space included."""
    return f"{int(first)} - {int(last)} "


def authors_text(token_ids: Sequence[int], intervals: Sequence[tuple[int, int]],
                 decode_fn: Callable[[Sequence[int]], str], *, evidence_token: str = "<evi>",
                 stop_text: str = AUTHORS_STOP_TEXT) -> str:
    """The answer text the authors' inference stores in ``a``.

    ``decode(all generated ids, special tokens kept).strip()``, every ``<evi>`` (in order)
    replaced by :func:`format_evidence` of its interval, then a trailing ``<|end|>`` cut off
    and the rest stripped again. The grounding stage and ``</evi>`` stay.

    Args:
      token_ids: the generated ids, the stop token included (``RowResult.token_ids``).
      intervals: the frame interval of each ``<evi>`` id, in order.
      decode_fn: ``ids -> text`` keeping special tokens (``TextTokenizer.decode``).
    Raises:
      ValueError: the decoded text holds fewer ``<evi>`` than there are intervals (their
        ``detokenize`` asserts equality).
    """
    text = decode_fn([int(t) for t in token_ids]).strip()
    pieces = text.split(evidence_token)
    if len(pieces) - 1 != len(intervals):
        raise ValueError(f"authors_text: {len(pieces) - 1} {evidence_token} in the decoded text but "
                         f"{len(intervals)} interval(s)")
    out = [pieces[0]]
    for (first, last), piece in zip(intervals, pieces[1:]):
        out += [format_evidence(first, last), piece]
    text = "".join(out)
    if text.endswith(stop_text):
        text = text[:-len(stop_text)].strip()
    return text


def authors_record(raw: Mapping, text: str, prompt_tokens: int, structured: Mapping) -> dict:
    """An E.T. Bench-layout prediction record as the authors' inference writes it: the input
    annotation record, ``a`` (:func:`authors_text`) and ``token length`` (prompt ids with the
    video as one placeholder), plus the project's structured fields under ``d2vlm_jax``."""
    record = dict(raw)
    record["a"] = text
    record["token length"] = int(prompt_tokens)
    record["d2vlm_jax"] = dict(structured)
    return record
