"""Scoring protocols, selected by name (``launch/score.py --protocol NAME``).

Each protocol scores prediction records in the E.T. Bench layout (``task``, ``source``,
the ground-truth fields of its benchmark, and ``a``: the raw answer text) and returns a
metrics dict. A protocol reimplements one scoring script exactly (the official E.T. Bench
script, the authors' D²VLM variants, the TimeChat-format Charades-STA / YouCook2 scripts)
or is the project's own cleaner rule set; ``docs/EVALUATION.md`` compares them side by side.

Every protocol lives in its own module of this package and registers itself with
:func:`register` when imported; the modules share the interval, IoU and parsing primitives
of ``d2vlm_jax.evaluation``. Sentence similarity (SentSim, the multiple-choice fallback) is
a parameter: ``similarity(texts_a, texts_b) -> scores`` on two equal-length lists.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from d2vlm_jax.evaluation.records import every_json_file
from d2vlm_jax.evaluation.sentsim import SentenceSimilarity


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named scoring protocol.

    Attributes:
      name: the ``--protocol`` name.
      benchmark: the benchmark whose records it scores (``etbench``, ``charades``,
        ``youcook2``, ``synthetic``).
      summary: one line for ``--help`` and ``metrics.json``.
      score: ``score(records, *, sentence_similarity=None, **options) -> dict`` of metrics
        (options a protocol does not use are ignored: ``tokenizer``, ``random_seed``,
        ``delimiter``).
      keep_file: which files of a predictions *directory* the protocol's script reads
        (``keep_file(joined_path)``; the official script skips paths containing "metrics").
    """

    name: str
    benchmark: str
    summary: str
    score: Callable[..., dict[str, Any]]
    keep_file: Callable[[str], bool] = every_json_file


PROTOCOLS: dict[str, Protocol] = {}

# Modules that define protocols; importing one registers its protocols. Append new ones.
_MODULES = (
    "project",
    "etbench",
    "etbench_strict_rvq",
    "d2vlm",
    "d2vlm_looser",
    "timechat_charades",
    "timechat_youcook2",
)


def register(protocol: Protocol) -> Protocol:
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} registered twice")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")


def names() -> list[str]:
    _load_all()
    return sorted(PROTOCOLS)


def get(name: str) -> Protocol:
    _load_all()
    if name not in PROTOCOLS:
        raise KeyError(f"unknown scoring protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


def score(name: str, records: Sequence[Mapping], *,
          sentence_similarity: SentenceSimilarity | None = None, **options: Any) -> dict[str, Any]:
    """Scores ``records`` under protocol ``name``; the result records the protocol's name.

    ``options`` go to the protocol's own keyword arguments.

    Raises:
      KeyError: unknown protocol name.
      d2vlm_jax.evaluation.records.EvaluationInputError: a record lacks a field its task
        needs (the message names the record and the field).
    """
    protocol = get(name)
    metrics = protocol.score(records, sentence_similarity=sentence_similarity, **options)
    return {"protocol": protocol.name, **metrics}
