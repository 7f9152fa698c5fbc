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

SentenceSimilarity = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named scoring protocol.

    Attributes:
      name: the ``--protocol`` name.
      benchmark: the benchmark whose records it scores (``etbench``, ``charades``,
        ``youcook2``, ``synthetic``).
      summary: one line for ``--help`` and ``metrics.json``.
      score: ``score(records, *, sentence_similarity=None) -> dict`` of metrics.
    """

    name: str
    benchmark: str
    summary: str
    score: Callable[..., dict[str, Any]]


PROTOCOLS: dict[str, Protocol] = {}

# Modules that define protocols; importing one registers its protocols.
_MODULES = ("project",)


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
          sentence_similarity: SentenceSimilarity | None = None) -> dict[str, Any]:
    """Scores ``records`` under protocol ``name``; the result records the protocol's name."""
    protocol = get(name)
    metrics = protocol.score(records, sentence_similarity=sentence_similarity)
    return {"protocol": protocol.name, **metrics}
