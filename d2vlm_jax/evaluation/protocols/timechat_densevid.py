"""The densevid / vid2seq dense-captioning evaluator as TimeChat ships it (``youcook2_timechat``).

Mirrors the data flow of TimeChat's ``eval_in_timechat_format.py`` step by step, because the
flow itself decides numbers: items are keyed ``"<video>_<n>"`` and tokenised in one batch
per threshold (so the tokenizer's line pairing spans videos), the random strings for
unmatched ground truth count in each CIDEr corpus, and SODA's METEOR scores come back in
string-key order. The rules are listed in ``timechat_youcook2``'s docstring.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from d2vlm_jax.evaluation import coco_caption
from d2vlm_jax.evaluation.iou import timechat_densevid_iou
from d2vlm_jax.evaluation.protocols.timechat_common import AuthorsStops

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
_NON_LETTERS = re.compile("[^a-zA-Z]")


@dataclasses.dataclass
class GroundTruth:
    """Ground-truth videos in evaluation order.

    Attributes:
      split: 1 train, 2 val, 3 test (names the ``SODA_c_<split>`` metric).
      keys: video names; segments: ``[start, end]`` floats, S per video; captions: S
        captions per video, each with ``.`` appended as the evaluator does; paragraphs:
        each video's captions joined by a space.
    """

    split: int
    keys: list[str] = dataclasses.field(default_factory=list)
    segments: list[list[list[float]]] = dataclasses.field(default_factory=list)
    captions: list[list[str]] = dataclasses.field(default_factory=list)
    paragraphs: list[str] = dataclasses.field(default_factory=list)

    def add(self, video: str, segments: Sequence, captions: Sequence[str], where: str) -> None:
        """Appends one video; raises ValueError (naming ``where``) on malformed ground truth."""
        if len(segments) != len(captions):
            raise ValueError(f"{where}: {len(segments)} segments but {len(captions)} captions "
                             "(the evaluator asserts they match)")
        if not segments:
            raise ValueError(f"{where}: a ground-truth video without segments (the evaluator "
                             "divides by the number of segments)")
        pairs = []
        for segment in segments:
            if (not isinstance(segment, (list, tuple)) or len(segment) != 2
                    or not all(isinstance(v, (int, float)) for v in segment)):
                raise ValueError(f"{where}: segment {segment!r} is not [start, end]")
            pairs.append([float(segment[0]), float(segment[1])])
        with_dots = [c + "." for c in captions]
        self.keys.append(video)
        self.segments.append(pairs)
        self.captions.append(with_dots)
        self.paragraphs.append(" ".join(with_dots))


def dp_assignment_score(scores: np.ndarray) -> float:
    """SODA's ``chased_dp_assignment`` maximum: best order-preserving one-to-one matching.

    ``dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + scores[i, j])`` with -1 for
    the missing neighbours of row/column 0 (NaN propagates as in ``np.max``).
    """
    rows, cols = scores.shape
    dp = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            up = dp[i - 1, j] if i else -1.0
            left = dp[i, j - 1] if j else -1.0
            diagonal = (dp[i - 1, j - 1] + scores[i, j]) if i and j else scores[i, j]
            dp[i, j] = np.max([up, left, diagonal])
    return float(dp[rows - 1, cols - 1])


def _cider(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, Sequence[str]],
           stops: AuthorsStops, where: str) -> float:
    """coco-caption ``Cider().compute_score`` on tokenised strings; its crash repaired to 0."""
    try:
        return coco_caption.cider(references, hypotheses)
    except coco_caption.CiderCrash:
        stops.stop("cider_without_reference_words",
                   f"{where}: no reference has a word (max() of an empty document frequency)")
        return 0.0


class DensevidEvaluator:
    """One evaluation run (its tokenizer, optional METEOR, random strings, stop counter)."""

    def __init__(self, tokenizer: coco_caption.CaptionTokenizer, meteor, stops: AuthorsStops,
                 random_caption: Callable[[], str], thresholds: Sequence[float] = THRESHOLDS):
        self.tokenizer = tokenizer
        self.meteor = meteor
        self.stops = stops
        self.random_caption = random_caption
        self.thresholds = tuple(thresholds)

    # ------------------------------------------------------------------ paragraphs
    def paragraph_metrics(self, predicted: Sequence[str], ground_truth: Sequence[str]
                          ) -> dict[str, Any]:
        """Corpus CIDEr/METEOR of paragraphs paired by position (``[a-zA-Z]`` words)."""
        preds, gts = {}, {}
        for i, (p, g) in enumerate(zip(predicted, ground_truth)):
            preds[str(i)] = [" ".join(_NON_LETTERS.sub(" ", p).strip().lower().split())]
            gts[str(i)] = [" ".join(_NON_LETTERS.sub(" ", g).strip().lower().split())]
        if not preds:
            self.stops.stop("no_predicted_video", "no ground-truth video has a converted "
                            "entry (paragraph CIDEr of an empty corpus)")
            return {"Para_CIDER": 0.0, "Para_METEOR": 0.0 if self.meteor else None}
        out = {"Para_CIDER": float(np.nan_to_num(_cider(gts, preds, self.stops, "paragraphs")))}
        out["Para_METEOR"] = (float(np.nan_to_num(self.meteor.compute_score(gts, preds)[0]))
                              if self.meteor else None)
        return out

    # ------------------------------------------------------------------ matching
    def match(self, segments, captions, gt_segments, gt_captions):
        """Per threshold: ``{str(n): [gt caption]}``, ``{str(n): [pred caption]}``, [n, ...].

        ``n`` counts items over all thresholds of the video; a prediction gets one item per
        GT segment with ``iou >= t``, or one against a random string.
        """
        gts = {t: {} for t in self.thresholds}
        preds = {t: {} for t in self.thresholds}
        numbers = {t: [] for t in self.thresholds}
        n = 0
        for segment, caption in zip(segments, captions):
            added = {t: False for t in self.thresholds}
            for gt_segment, gt_caption in zip(gt_segments, gt_captions):
                iou = timechat_densevid_iou(segment, gt_segment)
                for t in self.thresholds:
                    if iou >= t:
                        numbers[t].append(n)
                        gts[t][str(n)], preds[t][str(n)] = [gt_caption], [caption]
                        n += 1
                        added[t] = True
            for t in self.thresholds:
                if not added[t]:
                    numbers[t].append(n)
                    gts[t][str(n)], preds[t][str(n)] = [self.random_caption()], [caption]
                    n += 1
        return gts, preds, numbers

    def _tokenized(self, table: Mapping[str, list[str]], key: str, where: str) -> list[str]:
        if key not in table:
            self.stops.stop("tokenizer_lines", f"{where}: no tokenizer output line for {key!r}")
            return [""]
        return table[key]

    # ------------------------------------------------------------------ per video
    def detections(self, segments, gt_segments):
        """Precision/recall per threshold (``iou > t``) and the IoU matrix [S, max(K, 1)]."""
        iou_matrix = np.zeros((len(gt_segments), max(len(segments), 1)))
        covered = {t: (set(), set()) for t in self.thresholds}
        for g, gt_segment in enumerate(gt_segments):
            for p, segment in enumerate(segments):
                iou = timechat_densevid_iou(segment, gt_segment)
                iou_matrix[g, p] = iou
                for t in self.thresholds:
                    if iou > t:
                        covered[t][0].add(p)
                        covered[t][1].add(g)
        precision = [len(covered[t][0]) / max(float(len(segments)), 1.0) for t in self.thresholds]
        recall = [len(covered[t][1]) / float(len(gt_segments)) for t in self.thresholds]
        return precision, recall, iou_matrix

    def caption_scores(self, gts, preds, where: str) -> dict[str, Any]:
        """CIDEr (and METEOR) of one video, each the mean over the thresholds."""
        cider_values, meteor_values = [], []
        for t in self.thresholds:
            if not gts[t] or not preds[t]:
                cider_values.append(0.0)
                meteor_values.append(0.0)
                continue
            cider_values.append(float(np.nan_to_num(
                _cider(gts[t], preds[t], self.stops, f"{where} threshold {t}"))))
            if self.meteor:
                meteor_values.append(float(np.nan_to_num(
                    self.meteor.compute_score(gts[t], preds[t])[0])))
        return {"CIDER": float(np.mean(cider_values)),
                "METEOR": float(np.mean(meteor_values)) if self.meteor else None}

    def soda_c(self, iou_matrix: np.ndarray, captions: Sequence[str],
               gt_captions: Sequence[str]) -> float | None:
        """SODA(c) at IoU threshold 0 with METEOR scores in string-key order (None: no METEOR)."""
        if self.meteor is None:
            return None
        if not captions:
            return 0.0
        refs = {str(i): [c] for i, c in enumerate(captions)}
        score_matrix = np.array([np.nan_to_num(self.meteor.compute_score(
            refs, {k: [g] for k in refs})[1]) for g in gt_captions])
        iou = np.copy(iou_matrix)
        iou[iou < 0.0] = 0.0
        best = dp_assignment_score(iou * score_matrix)
        n_gt, n_pred = iou.shape
        precision, recall = best / n_pred, best / n_gt
        return float(np.mean([2 * precision * recall / (precision + recall)
                              if precision + recall > 0 else 0]))

    # ------------------------------------------------------------------ whole run
    def evaluate(self, converted: Mapping[str, Any], gt: GroundTruth) -> dict[str, Any]:
        """Means over ground-truth videos (fractions) plus the paragraph metrics."""
        segments, captions, paragraphs = [], [], []
        for key in gt.keys:
            entries = converted.get(key)
            if entries is None:
                segments.append([])
                captions.append([])
                continue
            segments.append([[float(v) for v in e["timestamp"]] for e in entries])
            captions.append([e["caption"] for e in entries])
            paragraphs.append(". ".join(captions[-1]))
        out = self.paragraph_metrics(paragraphs, gt.paragraphs)

        flat_gts = {t: {} for t in self.thresholds}
        flat_preds = {t: {} for t in self.thresholds}
        numbers_of = {t: {} for t in self.thresholds}
        for i, key in enumerate(gt.keys):
            gts, preds, numbers = self.match(segments[i], captions[i], gt.segments[i],
                                             gt.captions[i])
            for t in self.thresholds:
                for n, v in gts[t].items():
                    flat_gts[t][f"{key}_{n}"] = v
                for n, v in preds[t].items():
                    flat_preds[t][f"{key}_{n}"] = v
                numbers_of[t][key] = numbers[t]

        def tokenize(table):
            return self.tokenizer.tokenize(
                {k: [{"caption": c} for c in v] for k, v in table.items()})

        for t in self.thresholds:
            flat_gts[t] = tokenize(flat_gts[t])
            flat_preds[t] = tokenize(flat_preds[t])
        pred_tok = tokenize({f"{gt.keys[i]}_{j}": [c] for i, cs in enumerate(captions)
                             for j, c in enumerate(cs)})
        gt_tok = tokenize({f"{gt.keys[i]}_{j}": [c] for i, cs in enumerate(gt.captions)
                           for j, c in enumerate(cs)})

        per_video: dict[str, list] = {}
        for i, key in enumerate(gt.keys):
            where = f"video {key!r}"
            video_gts = {t: {str(n): self._tokenized(flat_gts[t], f"{key}_{n}", where)
                             for n in numbers_of[t][key]} for t in self.thresholds}
            video_preds = {t: {str(n): self._tokenized(flat_preds[t], f"{key}_{n}", where)
                               for n in numbers_of[t][key]} for t in self.thresholds}
            tok_captions = [self._tokenized(pred_tok, f"{key}_{j}", where)[0]
                            for j in range(len(captions[i]))]
            tok_gt_captions = [self._tokenized(gt_tok, f"{key}_{j}", where)[0]
                               for j in range(len(gt.captions[i]))]
            precision, recall, iou_matrix = self.detections(segments[i], gt.segments[i])
            result = self.caption_scores(video_gts, video_preds, where)
            soda = self.soda_c(iou_matrix, tok_captions, tok_gt_captions)
            mean_p, mean_r = sum(precision) / len(precision), sum(recall) / len(recall)
            for t, p, r in zip(self.thresholds, precision, recall):
                result[f"Precision@{t}"], result[f"Recall@{t}"] = p, r
            result["Precision_Mean"], result["Recall_Mean"] = mean_p, mean_r
            result["F1_Score"] = (2 * mean_r * mean_p / (mean_r + mean_p)
                                  if mean_r + mean_p > 0 else 0)
            result[f"SODA_c_{gt.split}"] = soda
            for split in (1, 2):  # the evaluator fills in -1 for a split the data lacks
                result.setdefault(f"SODA_c_{split}", -1)
            result["n_preds"] = len(tok_captions)
            for name, value in result.items():
                per_video.setdefault(name, []).append(value)

        for name, values in per_video.items():
            out[name] = None if any(v is None for v in values) else sum(values) / len(values)
        return out
