"""``d2vlm_jax``: the project's own protocol (``evaluation/metrics.py``).

Mirrors the official E.T. Bench definitions with the deviations listed in
``evaluation/metrics.py`` (every unusable answer is a miss in every average, deterministic
unmatched captions, IoU of a zero-length union is 0), plus Charades-STA and YouCook2.
"""

from d2vlm_jax.evaluation import metrics
from d2vlm_jax.evaluation.protocols import Protocol, register

register(Protocol(
    name="d2vlm_jax", benchmark="any",
    summary="the project's own rules: every unusable answer a miss (evaluation/metrics.py)",
    score=lambda records, *, sentence_similarity=None: metrics.evaluate_predictions(
        records, sentence_similarity)))
