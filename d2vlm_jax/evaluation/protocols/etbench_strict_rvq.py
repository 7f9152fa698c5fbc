"""``etbench_strict_rvq``: the official script with a final option letter for RAR / ECA / RVQ.

Reproduces ``compute_metrics_original_etchat_strict_rvq.py``, which differs from
``compute_metrics_original_etchat.py`` (protocol ``etbench``) in two lines of ``rvq_eval``
only: a parenthesised or leading option letter that names one of the options decides the
sample, right or wrong. The official script instead lets a WRONG letter fall through to the
next rule and finally to the SentSim comparison with the options (a "second chance" that can
turn a wrong letter into a hit). A letter that names no option (``(z)``) still falls through
in both. Every other task is scored exactly as ``etbench``.
"""

from __future__ import annotations

from collections.abc import Sequence

from d2vlm_jax.evaluation.protocols import Protocol, etbench, register

STRICT_CHOICE = etbench.ChoiceRules(parenthesized="final", leading="final")


def strict_rvq_eval(samples: list, ctx) -> dict:
    return etbench.choice_eval(samples, ctx, STRICT_CHOICE)


EVALUATORS = {**etbench.EVALUATORS, "rar": strict_rvq_eval, "eca": strict_rvq_eval,
              "rvq": strict_rvq_eval}


def score(records: Sequence, **options) -> dict:
    return etbench.score(records, evaluators=EVALUATORS,
                         reproduces="compute_metrics_original_etchat_strict_rvq.py", **options)


register(Protocol(
    name="etbench_strict_rvq", benchmark="etbench",
    summary="official E.T. Bench script, a parsed option letter is final (..._strict_rvq.py)",
    score=score, keep_file=etbench.official_file_filter))
