"""``d2vlm_looser``: the D²VLM script with a second chance for wrong option letters.

Reproduces ``new_compute_metircs_looser.py`` (sic), which differs from
``new_compute_metrics.py`` (protocol ``d2vlm``) in ``rvq_eval`` only (RAR / ECA / RVQ): a
leading option letter counts only when it is RIGHT; a wrong letter falls through to the
SentSim comparison with the options, which may still pick the right one. ``Failed`` and
``Matched_count`` therefore count right letters only (``d2vlm``: every valid letter). The
parenthesised-letter rule stays dead as in ``d2vlm``. Every other task is scored exactly as
``d2vlm``; the script's directory listing and log-file name differ, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from d2vlm_jax.evaluation.protocols import Protocol, d2vlm, etbench, register

LOOSER_CHOICE = etbench.ChoiceRules(parenthesized="dead", leading="retry", after_delimiter=True,
                                    counters=True, found_needs="right")


def looser_rvq_eval(samples: list, ctx) -> dict:
    return etbench.choice_eval(samples, ctx, LOOSER_CHOICE)


EVALUATORS = {**d2vlm.EVALUATORS, "rar": looser_rvq_eval, "eca": looser_rvq_eval,
              "rvq": looser_rvq_eval}


def score(records: Sequence, **options) -> dict:
    return d2vlm.score(records, evaluators=EVALUATORS, reproduces="new_compute_metircs_looser.py",
                       **options)


register(Protocol(
    name="d2vlm_looser", benchmark="etbench",
    summary="the D²VLM script, a wrong option letter gets the SentSim second chance "
    "(new_compute_metircs_looser.py)", score=score))
