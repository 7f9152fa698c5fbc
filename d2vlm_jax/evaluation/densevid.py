"""The dense-captioning evaluator of the E.T. Bench scripts (their ``DVCEval``), exactly.

Per IoU threshold t (E.T. Bench: 0.1, 0.3, 0.5, 0.7), over the videos of one task/source:

* **caption pairs**: every prediction is paired with EVERY ground-truth caption whose
  :func:`~d2vlm_jax.evaluation.iou.densevid_iou` is ``>= t``; a prediction matching none is
  paired with a random string of 10-20 lower-case letters (``random.randint(10, 20)``, then
  ``random.choice`` per letter, from the global ``random`` module, never seeded by the
  scripts -- pass ``rng`` to reproduce a run). Non-ASCII characters become spaces; both
  sides go through the PTB tokenizer.
* **scores per video** (0 for a video without pairs): BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
  (each over the video's pairs as one corpus) and SentSim (mean similarity of its pairs,
  ``similarity(references, predictions)``); then the mean over videos.
* **detection** (separately): per video, precision = covered predictions / predictions,
  recall = covered GT / GT, "covered" meaning IoU ``> t`` (strict); means over videos.
  With ``evidence`` (the D²VLM script) the same for the grounding-stage intervals.

Videos are visited in the order of ``list(set(video ids))`` -- string hashing decides it
(``PYTHONHASHSEED``), as in the scripts; it decides which unmatched prediction gets which
random string.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from d2vlm_jax.evaluation import coco_caption
from d2vlm_jax.evaluation.iou import densevid_iou
from d2vlm_jax.evaluation.sentsim import SentenceSimilarity, checked_scores

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SentSim")


def remove_nonascii(text: str) -> str:
    return "".join(c if ord(c) < 128 else " " for c in text)


def random_string(rng) -> str:
    length = rng.randint(10, 20)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


class DenseCaptionEvaluation:
    """One ``DVCEval`` run (one task/source of DVC or SLC).

    Args:
      ground_truth: video -> ``{"timestamps": [[s, e], ...], "sentences": [str, ...]}``.
      prediction: video -> ``[{"sentence": str, "timestamp": [s, e]}, ...]`` (first 1000).
      thresholds: IoU thresholds.
      evidence: video -> grounding-stage intervals (D²VLM script) or None.
      similarity: sentence similarity or None (SentSim then None).
      tokenizer: the PTB tokenizer back end.
      meteor: a :class:`~d2vlm_jax.evaluation.coco_caption.Meteor` (None or unavailable:
        METEOR is None).
      rng: ``random``-compatible source of the unmatched captions' strings.
    """

    def __init__(self, ground_truth: Mapping, prediction: Mapping, thresholds: Sequence[float], *,
                 evidence: Mapping | None = None, similarity: SentenceSimilarity | None = None,
                 tokenizer: coco_caption.CaptionTokenizer, meteor=None, rng=random,
                 max_proposals: int = 1000):
        self.ground_truth = ground_truth
        self.prediction = {v: list(p)[:max_proposals] for v, p in prediction.items()}
        self.evidence = evidence
        self.thresholds = thresholds
        self.similarity = similarity
        self.tokenizer = tokenizer
        self.meteor = meteor if meteor is not None and meteor.available else None
        self.rng = rng
        video_ids: set = set([])
        video_ids |= set(ground_truth.keys())
        self.video_ids = list(video_ids)

    def evaluate(self) -> dict[str, list]:
        """Every metric, one value per threshold (``None`` where unavailable)."""
        scores: dict[str, list] = {}
        for t in self.thresholds:
            for metric, value in self._caption_scores(t).items():
                scores.setdefault(metric, []).append(value)
        scores["Recall"], scores["Precision"] = [], []
        for t in self.thresholds:
            precision, recall = self._detection(t, self.prediction, timestamps_of=lambda p: p["timestamp"])
            scores["Recall"].append(recall)
            scores["Precision"].append(precision)
        if self.evidence is not None:
            scores["Recall_evi"], scores["Precision_evi"] = [], []
            for t in self.thresholds:
                precision, recall = self._detection(t, self.evidence, timestamps_of=lambda p: p)
                scores["Recall_evi"].append(recall)
                scores["Precision_evi"].append(precision)
        return scores

    def _detection(self, threshold: float, predicted: Mapping, timestamps_of) -> tuple[float, float]:
        recalls, precisions = [], []
        for video in self.video_ids:
            refs = self.ground_truth[video]["timestamps"]
            covered_refs, covered_preds = set(), set()
            count = len(predicted[video])
            for i, item in enumerate(predicted[video]):
                for j, ref in enumerate(refs):
                    if densevid_iou(timestamps_of(item), ref) > threshold:
                        covered_refs.add(j)
                        covered_preds.add(i)
            # An empty list leaves the scripts' loop variable stale or undefined: the
            # precision is 0 either way (no covered prediction).
            precision = float(len(covered_preds)) / count if count else 0.0
            precisions.append(max(0, precision))
            recalls.append(max(0, float(len(covered_refs)) / len(refs)))
        return sum(precisions) / len(precisions), sum(recalls) / len(recalls)

    def _caption_scores(self, threshold: float) -> dict[str, Any]:
        pairs_of: dict = {}
        predictions: dict = {}
        references: dict = {}
        index = 0
        for video in self.video_ids:
            pairs_of[video] = []
            if video not in self.prediction:
                continue
            truth = self.ground_truth[video]
            for item in self.prediction[video]:
                added = False
                for k, timestamp in enumerate(truth["timestamps"]):
                    if densevid_iou(item["timestamp"], timestamp) >= threshold:
                        predictions[index] = [{"caption": remove_nonascii(item["sentence"])}]
                        references[index] = [{"caption": remove_nonascii(truth["sentences"][k])}]
                        pairs_of[video].append(index)
                        index += 1
                        added = True
                if not added:
                    predictions[index] = [{"caption": remove_nonascii(item["sentence"])}]
                    references[index] = [{"caption": random_string(self.rng)}]
                    pairs_of[video].append(index)
                    index += 1
        tokenized_predictions = self.tokenizer.tokenize(predictions)
        tokenized_references = self.tokenizer.tokenize(references)
        res = {v: {i: tokenized_predictions[i] for i in ids} for v, ids in pairs_of.items()}
        gts = {v: {i: tokenized_references[i] for i in ids} for v, ids in pairs_of.items()}

        per_video: dict[str, list] = {m: [] for m in ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SentSim")}
        for video in self.video_ids:
            empty = len(res[video]) == 0 or len(gts[video]) == 0
            per_video["Bleu"].append([0] * 4 if empty else coco_caption.bleu(gts[video], res[video]))
            per_video["METEOR"].append(0 if empty else (self.meteor.score(gts[video], res[video])
                                                        if self.meteor is not None else None))
            per_video["ROUGE_L"].append(0 if empty else coco_caption.rouge_l(gts[video], res[video]))
            per_video["CIDEr"].append(0 if empty else coco_caption.cider(gts[video], res[video]))
            per_video["SentSim"].append(0 if empty else self._sentsim(gts[video], res[video]))
        out: dict[str, Any] = {}
        bleu = np.mean(per_video["Bleu"], axis=0)
        for n in range(4):
            out[f"Bleu_{n + 1}"] = bleu[n]
        for metric in ("METEOR", "ROUGE_L", "CIDEr", "SentSim"):
            values = per_video[metric]
            out[metric] = None if any(v is None for v in values) else np.mean(values)
        return out

    def _sentsim(self, gts: Mapping, res: Mapping) -> float | None:
        if self.similarity is None:
            return None
        keys = list(gts.keys())
        scores = checked_scores(self.similarity, [gts[k][0] for k in keys], [res[k][0] for k in keys])
        return float(sum(scores) / len(scores))
