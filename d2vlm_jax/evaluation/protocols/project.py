"""``d2vlm_jax``: the project's own scoring rules (SPEC §6): E.T. Bench, Charades-STA, YouCook2.

Pure functions over Python / numpy data; no JAX. Intervals are ``(start, end)`` in
seconds. All rates are fractions in [0, 1] (E.T. Bench prints them x100). The exact
reimplementations of the authors' scripts are the other protocols of this package
(``etbench``, ``d2vlm``, ...); ``docs/EVALUATION.md`` compares them.

E.T. Bench definitions follow the official ``compute_metrics.py`` (E.T. Bench evaluation
kit, also shipped in the D²VLM repository as ``compute_metrics_original_etchat.py``):

* every task is scored per *source* dataset, the task score is the mean over its sources,
  and a merged score is the mean of its tasks' scores;
* TVG / EPM: IoU of the **first** predicted interval with the GT interval; hit@t is
  ``IoU >= t``; "F1" = mean over t in {0.1, 0.3, 0.5, 0.7} of the hit rate. (The authors'
  modified D²VLM script takes the max IoU over all answer intervals, which is looser; we
  follow the official benchmark.)
* TEM: the first predicted interval against the best-matching GT interval; "mRec" as TVG.
* TAL: per sample and threshold, *coverage* precision/recall (a GT interval counts as found
  if any prediction has IoU >= t with it, a prediction is correct if it has IoU >= t with any
  GT), F1 = 2PR/(P+R), 0 when no pair reaches t. This is **not** one-to-one matching: the
  official code uses coverage and we mirror it.
* EVS: per-second binary masks (``round()`` of both ends, half-open ``[s, e)``, 1000 s
  long), F1 of the masks per sample.
* VHD: hit if the predicted timestamp lies in any GT span (inclusive). The timestamp is the
  midpoint of the first predicted interval (SPEC §6, as in the authors' modified script);
  the official rule reads the first number in the answer, which for an "a - b" answer would
  be the start.
* DVC / SLC: per sample and threshold t in {0.1, 0.3, 0.5, 0.7}: precision = share of
  predictions with IoU > t with some GT, recall = share of GT with IoU > t with some
  prediction (strict ``>``, as official); P and R are averaged over samples, then
  F1@t = 2PR/(P+R); "F1" = mean over t. SentSim: for each t every prediction is paired with
  every GT caption with IoU >= t; a prediction without a match scores 0; per sample the mean
  over pairs, then the mean over samples and over t.
* GVQ: the multiple-choice answer must be right, then the first interval is scored like
  TVG; "mRec" as TVG, "Acc" reported too.
* RAR / EVC (``eca`` in the benchmark files) / RVQ: multiple-choice accuracy.

Misses: an empty or unparseable response is a miss (hit 0, F1 0, similarity 0) and is
counted in ``num_unparseable``. Where the official script instead drops failed samples from
the average (EVS F1, DVC/SLC SentSim), we report the official number as
``*_parsed_only`` next to ours; the task score uses ours.

Other deviations from the official script: an IoU whose union is 0 is 0 (official: NaN);
an unmatched dense caption scores 0 instead of being compared with a random string (both
near 0, ours is deterministic); a multiple-choice answer whose letter is parsed is not
re-scored by sentence similarity; GVQ accepts a parenthesized letter anywhere, like the
other multiple-choice tasks (official GVQ reads a leading letter only); samples are keyed
by their position, not by video path.

Sentence similarity (SentSim, and the E.T. Bench multiple-choice fallback for answers
without an option letter) is an injected callable. The benchmark uses all-MiniLM-L6-v2
cosine similarity, available only with an optional extra; without it SentSim is reported
as ``None`` with a note, never as a made-up number, and letter-less multiple-choice answers
are misses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from d2vlm_jax.evaluation import cider as cider_lib
from d2vlm_jax.evaluation import parsing
from d2vlm_jax.evaluation.iou import pairwise_temporal_iou, temporal_iou
from d2vlm_jax.evaluation.protocols import Protocol, register
from d2vlm_jax.evaluation.records import EvaluationInputError
from d2vlm_jax.evaluation.records import describe as _describe
from d2vlm_jax.evaluation.records import field as _field
from d2vlm_jax.evaluation.sentsim import SentenceSimilarity

logger = logging.getLogger(__name__)

Interval = tuple[float, float]

ETBENCH_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
CHARADES_THRESHOLDS = (0.3, 0.5, 0.7)
YOUCOOK2_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
EVS_MASK_SECONDS = 1000

TASK_ALIASES = {"evc": "eca"}
ETBENCH_TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc",
                 "tem", "gvq")
OTHER_TASKS = ("charades_sta", "youcook2_dvc")
ETBENCH_MERGED = {
    "Acc(ref)": (("rar", "eca", "rvq"), "Acc"),
    "F1(gnd)": (("tvg", "epm", "tal", "evs", "vhd"), "F1"),
    "F1(cap)": (("dvc", "slc"), "F1"),
    "Sim(cap)": (("dvc", "slc"), "SentSim"),
    "Rec(com)": (("tem", "gvq"), "mRec"),
}
TASK_SCORE_KEY = {"tvg": "F1", "epm": "F1", "tal": "F1", "evs": "F1", "vhd": "F1",
                  "dvc": "F1", "slc": "F1", "tem": "mRec", "gvq": "mRec", "rar": "Acc",
                  "eca": "Acc", "rvq": "Acc", "charades_sta": "mIoU", "youcook2_dvc": "F1"}
SENTSIM_UNAVAILABLE = ("SentSim unavailable: no sentence-similarity model was given (the "
                       "all-MiniLM-L6-v2 extra is not installed); reported as None.")


# ------------------------------------------------------------------- grounding metrics

def recall_at_iou(ious: Sequence[float | None],
                  thresholds: Sequence[float] = ETBENCH_THRESHOLDS) -> dict[str, Any]:
    """Hit rates ``R@t`` (IoU >= t), their mean ``mRec`` and ``mIoU`` over samples.

    Args:
      ious: one IoU per sample; None = unparseable prediction (a miss, IoU 0).
    """
    n = len(ious)
    values = [0.0 if x is None else float(x) for x in ious]
    out: dict[str, Any] = {"num_samples": n,
                           "num_unparseable": sum(x is None for x in ious)}
    recalls = []
    for t in thresholds:
        r = sum(v >= t for v in values) / n if n else 0.0
        out[f"R@{t}"] = r
        recalls.append(r)
    out["mRec"] = sum(recalls) / len(recalls) if recalls else 0.0
    out["mIoU"] = sum(values) / n if n else 0.0
    return out


def best_iou(prediction: Interval | None, ground_truths: Sequence[Interval]) -> float | None:
    """Max IoU of one predicted interval with a list of GT intervals (None if no prediction)."""
    if prediction is None:
        return None
    return float(pairwise_temporal_iou([prediction], ground_truths).max()) if ground_truths else 0.0


def tal_f1(predictions: Sequence[Interval], ground_truths: Sequence[Interval],
           threshold: float) -> float:
    """E.T. Bench TAL F1 of one sample at one IoU threshold (coverage, not one-to-one)."""
    if not predictions or not ground_truths:
        return 0.0
    iou = pairwise_temporal_iou(ground_truths, predictions)  # [G, P]
    if iou.max() < threshold:
        return 0.0
    recall = float(np.mean(iou.max(axis=1) >= threshold))
    precision = float(np.mean(iou.max(axis=0) >= threshold))
    return 2 * precision * recall / (precision + recall)


def _seconds_mask(intervals: Iterable[Interval], length: int) -> np.ndarray:
    mask = np.zeros(length, bool)
    for start, end in intervals:
        s = max(0, round(start))
        e = round(end)
        if e > s:
            mask[s:e] = True
    return mask


def evs_f1(predictions: Sequence[Interval], ground_truths: Sequence[Interval],
           mask_seconds: int = EVS_MASK_SECONDS) -> float:
    """E.T. Bench EVS F1 of one sample: per-second masks ``[round(s), round(e))``."""
    predicted = _seconds_mask(predictions, mask_seconds)
    truth = _seconds_mask(ground_truths, mask_seconds)
    true_positive = int(np.sum(predicted & truth))
    if true_positive == 0:
        return 0.0
    precision = true_positive / int(predicted.sum())
    recall = true_positive / int(truth.sum())
    return 2 * precision * recall / (precision + recall)


def vhd_hit(point: float | None, ground_truth_spans: Sequence[Interval]) -> bool:
    """True if the predicted timestamp lies inside any GT span (ends inclusive)."""
    if point is None:
        return False
    return any(start <= point <= end for start, end in ground_truth_spans)


def detection_precision_recall(predictions: Sequence[Interval],
                               ground_truths: Sequence[Interval],
                               threshold: float) -> tuple[float, float]:
    """Dense-captioning detection P/R of one video: coverage with IoU strictly > t.

    Precision = share of predictions overlapping some GT with IoU > t (0 without
    predictions); recall = share of GT overlapped by some prediction.
    """
    if not ground_truths:
        raise ValueError("detection_precision_recall: a sample needs at least one GT interval")
    if not predictions:
        return 0.0, 0.0
    iou = pairwise_temporal_iou(predictions, ground_truths) > threshold  # [P, G]
    return float(iou.any(axis=1).mean()), float(iou.any(axis=0).mean())


def match_captions(predictions: Sequence[tuple[Interval, str]],
                   ground_truths: Sequence[tuple[Interval, str]],
                   threshold: float) -> list[tuple[str, str | None]]:
    """Caption pairs for caption metrics at one threshold (IoU >= t).

    Every prediction is paired with every GT caption it overlaps with IoU >= t; a
    prediction with no such GT gives one ``(caption, None)`` pair (scored 0).
    """
    pairs: list[tuple[str, str | None]] = []
    for interval, caption in predictions:
        matched = [gt_caption for gt_interval, gt_caption in ground_truths
                   if temporal_iou(interval, gt_interval) >= threshold]
        pairs.extend((caption, gt_caption) for gt_caption in matched)
        if not matched:
            pairs.append((caption, None))
    return pairs


def harmonic_f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------- record validation

def _response(record: Mapping, position: int) -> str:
    for key in ("a", "answer", "response"):
        if key in record:
            value = record[key]
            if value is None:
                return ""
            if not isinstance(value, str):
                raise EvaluationInputError(
                    f"{_describe(record, position)}: field {key!r} must be a string")
            return value
    raise EvaluationInputError(f"{_describe(record, position)}: missing field 'a' "
                               "(the model's response)")


def _as_intervals(value: Any, record: Mapping, position: int, name: str) -> list[Interval]:
    try:
        array = np.asarray(value, np.float64)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
            raise ValueError
    except (TypeError, ValueError):
        raise EvaluationInputError(f"{_describe(record, position)}: field {name!r} must be an "
                                   f"interval [s, e] or a non-empty list of them, got {value!r}")
    return [(float(min(s, e)), float(max(s, e))) for s, e in array]


def _intervals(record: Mapping, position: int, name: str) -> list[Interval]:
    return _as_intervals(_field(record, position, name), record, position, name)


def _vhd_spans(record: Mapping, position: int) -> list[Interval]:
    value = _field(record, position, "tgt")
    # One annotator: [[s, e], ...]; several annotators: [[[s, e], ...], ...].
    if (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple))
            and value[0] and isinstance(value[0][0], (list, tuple))):
        value = [span for annotator in value for span in annotator]
    return _as_intervals(value, record, position, "tgt")


def _answer_text(record: Mapping, position: int) -> str:
    return parsing.split_response(_response(record, position))[1]


# --------------------------------------------------------------------- task evaluators

def _grounding_ious(samples, first_only_gt: bool) -> list[float | None]:
    ious = []
    for position, record in samples:
        ground_truths = _intervals(record, position, "tgt")
        prediction = parsing.parse_first_interval(_answer_text(record, position))
        if first_only_gt and len(ground_truths) != 1:
            raise EvaluationInputError(f"{_describe(record, position)}: field 'tgt' must be "
                                       "a single interval for this task")
        ious.append(best_iou(prediction, ground_truths))
    return ious


def _rename_recalls(metrics: dict, prefix: str, score_key: str) -> dict:
    out = {}
    for key, value in metrics.items():
        if key.startswith("R@"):
            out[prefix + key[1:]] = value
        elif key == "mRec":
            out[score_key] = value
        else:
            out[key] = value
    return out


def eval_tvg(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """TVG / EPM: ``F1@t`` = hit rate of the first interval at IoU >= t; F1 = their mean."""
    metrics = recall_at_iou(_grounding_ious(samples, first_only_gt=True), ETBENCH_THRESHOLDS)
    return _rename_recalls(metrics, "F1", "F1")


def eval_tem(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """TEM: first interval vs the best GT interval; ``R@t`` and their mean ``mRec``."""
    return recall_at_iou(_grounding_ious(samples, first_only_gt=False), ETBENCH_THRESHOLDS)


def eval_tal(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """TAL: per-sample coverage F1 per threshold, averaged over samples, then thresholds."""
    totals = [0.0] * len(ETBENCH_THRESHOLDS)
    unparseable = 0
    for position, record in samples:
        ground_truths = _intervals(record, position, "tgt")
        predictions = parsing.parse_intervals(_answer_text(record, position))
        if not predictions:
            unparseable += 1
            continue
        for i, t in enumerate(ETBENCH_THRESHOLDS):
            totals[i] += tal_f1(predictions, ground_truths, t)
    n = len(samples)
    out: dict[str, Any] = {"num_samples": n, "num_unparseable": unparseable}
    f1s = [total / n if n else 0.0 for total in totals]
    out.update({f"F1@{t}": f for t, f in zip(ETBENCH_THRESHOLDS, f1s)})
    out["F1"] = sum(f1s) / len(f1s)
    return out


def eval_evs(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """EVS: per-sample per-second mask F1, averaged (misses count 0; see module doc)."""
    f1s: list[float | None] = []
    for position, record in samples:
        ground_truths = _intervals(record, position, "tgt")
        predictions = parsing.parse_intervals(_answer_text(record, position))
        f1s.append(evs_f1(predictions, ground_truths) if predictions else None)
    parsed = [f for f in f1s if f is not None]
    n = len(samples)
    return {"num_samples": n, "num_unparseable": n - len(parsed),
            "F1": sum(parsed) / n if n else 0.0,
            "F1_parsed_only": sum(parsed) / len(parsed) if parsed else 0.0}


def eval_vhd(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """VHD: hit rate of the predicted timestamp (midpoint of the first interval)."""
    hits, unparseable = 0, 0
    for position, record in samples:
        spans = _vhd_spans(record, position)
        point = parsing.parse_point(_answer_text(record, position))
        if point is None:
            unparseable += 1
        hits += vhd_hit(point, spans)
    n = len(samples)
    return {"num_samples": n, "num_unparseable": unparseable, "F1": hits / n if n else 0.0}


def _options(record: Mapping, position: int) -> list[str]:
    options = _field(record, position, "o")
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= 26:
        raise EvaluationInputError(f"{_describe(record, position)}: field 'o' must be a list "
                                   f"of 2..26 options, got {options!r}")
    rendered = []
    for option in options:
        if isinstance(option, (list, tuple)):
            option = f"{option[0]} - {option[1]}"
        rendered.append(str(option))
    return rendered


def _correct_option(record: Mapping, position: int, num_options: int) -> int:
    answer = _field(record, position, "p")
    if not isinstance(answer, (int, np.integer)) or not 0 <= answer < num_options:
        raise EvaluationInputError(f"{_describe(record, position)}: field 'p' must be an "
                                   f"option index in [0, {num_options}), got {answer!r}")
    return int(answer)


def _choose(text: str, options: Sequence[str],
            sentence_similarity: SentenceSimilarity | None) -> tuple[int | None, bool]:
    """(chosen option or None, whether an option letter was parsed)."""
    choice = parsing.parse_choice(text, len(options))
    if choice is not None:
        return choice, True
    cleaned = text.strip().lower()
    if cleaned.startswith("best option:"):
        cleaned = cleaned[len("best option:"):]
    cleaned = cleaned.lstrip().lstrip("(").lstrip()
    if not cleaned or sentence_similarity is None:
        return None, False
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    labelled = [f"({letters[i]}) {option}" for i, option in enumerate(options)]
    scores = list(sentence_similarity([cleaned] * len(options), labelled))
    return int(np.argmax(scores)), False


def eval_multiple_choice(samples: Sequence[tuple[int, Mapping]],
                         sentence_similarity: SentenceSimilarity | None = None
                         ) -> dict[str, Any]:
    """RAR / EVC / RVQ accuracy. Answers without an option letter are ``num_unparseable``;
    they are scored by sentence similarity to the options when a model is given (E.T.
    Bench's fallback), else they are misses."""
    hits, unparseable = 0, 0
    for position, record in samples:
        options = _options(record, position)
        correct = _correct_option(record, position, len(options))
        choice, had_letter = _choose(_answer_text(record, position), options,
                                     sentence_similarity)
        unparseable += not had_letter
        hits += choice == correct
    n = len(samples)
    return {"num_samples": n, "num_unparseable": unparseable, "Acc": hits / n if n else 0.0}


def eval_gvq(samples: Sequence[tuple[int, Mapping]],
             sentence_similarity: SentenceSimilarity | None = None) -> dict[str, Any]:
    """GVQ: recall of the grounding (as TVG) counted only where the choice is right."""
    ious: list[float | None] = []
    correct_choices, unparseable = 0, 0
    for position, record in samples:
        options = _options(record, position)
        correct = _correct_option(record, position, len(options))
        ground_truths = _intervals(record, position, "tgt")
        text = _answer_text(record, position)
        choice, had_letter = _choose(text, options, sentence_similarity)
        prediction = parsing.parse_first_interval(text)
        unparseable += (not had_letter) or prediction is None
        if choice != correct:
            ious.append(0.0)
            continue
        correct_choices += 1
        ious.append(best_iou(prediction, ground_truths) or 0.0)
    out = recall_at_iou(ious, ETBENCH_THRESHOLDS)
    out["num_unparseable"] = unparseable
    out["Acc"] = correct_choices / len(samples) if samples else 0.0
    return out


def _dense_samples(samples):
    parsed = []
    for position, record in samples:
        gt_intervals = _intervals(record, position, "tgt")
        captions = _field(record, position, "g")
        if not isinstance(captions, (list, tuple)) or len(captions) != len(gt_intervals):
            raise EvaluationInputError(f"{_describe(record, position)}: field 'g' must hold one "
                                       f"caption per 'tgt' interval ({len(gt_intervals)})")
        predictions = parsing.parse_dense_captions(_answer_text(record, position))
        parsed.append((list(zip(gt_intervals, map(str, captions))), predictions))
    return parsed


def _sentsim_by_sample(parsed, threshold: float, similarity: SentenceSimilarity) -> list[float]:
    """Mean similarity of the caption pairs of every sample with predictions."""
    pair_owner, texts_a, texts_b = [], [], []
    sample_pairs = []
    for ground_truths, predictions in parsed:
        pairs = match_captions(predictions, ground_truths, threshold)
        sample_pairs.append(pairs)
    flat = [(s, pred, gt) for s, pairs in enumerate(sample_pairs) for pred, gt in pairs
            if gt is not None]
    for s, pred, gt in flat:  # SentSim sees PTB-style tokenized captions, as official
        pair_owner.append(s)
        texts_a.append(" ".join(cider_lib.tokenize_caption(pred)))
        texts_b.append(" ".join(cider_lib.tokenize_caption(gt)))
    scores = list(similarity(texts_a, texts_b)) if texts_a else []
    if len(scores) != len(texts_a):
        raise ValueError(f"sentence similarity returned {len(scores)} scores for "
                         f"{len(texts_a)} pairs")
    totals = defaultdict(float)
    for s, score in zip(pair_owner, scores):
        totals[s] += float(score)
    return [totals[s] / len(pairs) if pairs else 0.0 for s, pairs in enumerate(sample_pairs)]


def eval_dense_captioning(samples: Sequence[tuple[int, Mapping]],
                          sentence_similarity: SentenceSimilarity | None = None
                          ) -> dict[str, Any]:
    """DVC / SLC: detection F1 over IoU thresholds and SentSim of matched captions."""
    parsed = _dense_samples(samples)
    n = len(parsed)
    has_predictions = [bool(predictions) for _, predictions in parsed]
    out: dict[str, Any] = {"num_samples": n, "num_unparseable": n - sum(has_predictions)}
    f1s = []
    for t in ETBENCH_THRESHOLDS:
        precision = recall = 0.0
        for ground_truths, predictions in parsed:
            p, r = detection_precision_recall([i for i, _ in predictions],
                                              [i for i, _ in ground_truths], t)
            precision += p
            recall += r
        precision, recall = (precision / n, recall / n) if n else (0.0, 0.0)
        out[f"P@{t}"], out[f"R@{t}"] = precision, recall
        out[f"F1@{t}"] = harmonic_f1(precision, recall)
        f1s.append(out[f"F1@{t}"])
    out["F1"] = sum(f1s) / len(f1s)
    if sentence_similarity is None:
        out["SentSim"] = out["SentSim_parsed_only"] = None
        return out
    per_threshold, per_threshold_parsed = [], []
    num_parsed = sum(has_predictions)
    for t in ETBENCH_THRESHOLDS:
        scores = _sentsim_by_sample(parsed, t, sentence_similarity)
        per_threshold.append(sum(scores) / n if n else 0.0)
        per_threshold_parsed.append(sum(scores) / num_parsed if num_parsed else 0.0)
    out["SentSim"] = sum(per_threshold) / len(per_threshold)
    out["SentSim_parsed_only"] = sum(per_threshold_parsed) / len(per_threshold_parsed)
    return out


def eval_charades_sta(samples: Sequence[tuple[int, Mapping]]) -> dict[str, Any]:
    """Charades-STA: ``R@{0.3,0.5,0.7}`` and mIoU of the first predicted interval.

    Unparseable answers are misses (the TimeChat-format script the authors used divides by
    the number of parsed answers instead)."""
    return recall_at_iou(_grounding_ious(samples, first_only_gt=True), CHARADES_THRESHOLDS)


def eval_youcook2(samples: Sequence[tuple[int, Mapping]],
                  thresholds: Sequence[float] = YOUCOOK2_THRESHOLDS) -> dict[str, Any]:
    """YouCook2 dense captioning, as the densevid / TimeChat evaluator the authors used.

    Per video: P@t / R@t by coverage with IoU > t (precision 0 without predictions),
    ``P``/``R`` = their means over t, video F1 = 2PR/(P+R); CIDEr-D per video and threshold
    over the pairs of :func:`match_captions` (IoU >= t; an unmatched prediction is paired
    with a reference that matches nothing), averaged over t. Every number is then averaged
    over videos (unparseable videos have no prediction and score 0).
    """
    parsed = _dense_samples(samples)
    n = len(parsed)
    sums = defaultdict(float)
    for ground_truths, predictions in parsed:
        pred_intervals = [i for i, _ in predictions]
        gt_intervals = [i for i, _ in ground_truths]
        precisions, recalls, ciders = [], [], []
        for t in thresholds:
            p, r = detection_precision_recall(pred_intervals, gt_intervals, t)
            precisions.append(p)
            recalls.append(r)
            sums[f"P@{t}"] += p
            sums[f"R@{t}"] += r
            pairs = match_captions(predictions, ground_truths, t)
            if pairs:
                references = {k: [cider_lib.tokenize_caption(gt)] if gt is not None else [[]]
                              for k, (_, gt) in enumerate(pairs)}
                candidates = {k: cider_lib.tokenize_caption(pred)
                              for k, (pred, _) in enumerate(pairs)}
                ciders.append(cider_lib.cider_d(references, candidates)[0])
            else:
                ciders.append(0.0)
        precision = sum(precisions) / len(precisions)
        recall = sum(recalls) / len(recalls)
        sums["Precision"] += precision
        sums["Recall"] += recall
        sums["F1"] += harmonic_f1(precision, recall)
        sums["CIDEr"] += sum(ciders) / len(ciders)
    out: dict[str, Any] = {"num_samples": n,
                           "num_unparseable": sum(not p for _, p in parsed)}
    for key, value in sums.items():
        out[key] = value / n if n else 0.0
    return out


# ------------------------------------------------------------------------ dispatcher

def _canonical_task(record: Mapping, position: int) -> str:
    task = str(_field(record, position, "task")).lower()
    task = TASK_ALIASES.get(task, task)
    if task not in ETBENCH_TASKS + OTHER_TASKS:
        raise EvaluationInputError(f"{_describe(record, position)}: unknown task {task!r}; "
                                   f"known: {ETBENCH_TASKS + OTHER_TASKS}")
    return task


def evaluate_task(task: str, samples: Sequence[tuple[int, Mapping]],
                  sentence_similarity: SentenceSimilarity | None = None) -> dict[str, Any]:
    """Metrics of one task on ``(position, record)`` samples of one source."""
    if task in ("tvg", "epm"):
        return eval_tvg(samples)
    if task == "tem":
        return eval_tem(samples)
    if task == "tal":
        return eval_tal(samples)
    if task == "evs":
        return eval_evs(samples)
    if task == "vhd":
        return eval_vhd(samples)
    if task in ("dvc", "slc"):
        return eval_dense_captioning(samples, sentence_similarity)
    if task in ("rar", "eca", "rvq"):
        return eval_multiple_choice(samples, sentence_similarity)
    if task == "gvq":
        return eval_gvq(samples, sentence_similarity)
    if task == "charades_sta":
        return eval_charades_sta(samples)
    if task == "youcook2_dvc":
        return eval_youcook2(samples)
    raise ValueError(f"evaluate_task: unknown task {task!r}")


def evaluate_predictions(records: Sequence[Mapping],
                         sentence_similarity: SentenceSimilarity | None = None
                         ) -> dict[str, Any]:
    """Scores prediction records of any mix of tasks.

    Each record follows the E.T. Bench file format plus the response: ``task`` (E.T. Bench
    task name, ``evc`` accepted for ``eca``, or ``charades_sta`` / ``youcook2_dvc``),
    optional ``source`` (sub-dataset; default ``"default"``), ``a`` (the rendered response,
    SPEC §5.4), ``tgt`` (GT interval(s) in seconds), and per task ``o`` (options), ``p``
    (index of the right option), ``g`` (GT captions, one per ``tgt`` interval).

    Returns a dict::

        {"tasks": {task: {"sources": {source: metrics}, "score": float | None,
                          "score_key": str, "num_samples": int, "num_unparseable": int}},
         "etbench_merged": {"Acc(ref)": ..., "F1(gnd)": ..., "F1(cap)": ...,
                            "Sim(cap)": ..., "Rec(com)": ...},   # None where a task is absent
         "num_samples": int, "num_unparseable": int, "notes": [str, ...]}

    Raises:
      EvaluationInputError: a record lacks a field its task needs, or holds a malformed one
        (the message names the record's position, idx, video, task and the field).
    """
    grouped: dict[str, dict[str, list[tuple[int, Mapping]]]] = defaultdict(
        lambda: defaultdict(list))
    for position, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise EvaluationInputError(f"record {position}: expected a dict, got "
                                       f"{type(record).__name__}")
        task = _canonical_task(record, position)
        grouped[task][str(record.get("source", "default"))].append((position, record))

    notes: list[str] = []
    tasks_out: dict[str, Any] = {}
    for task in sorted(grouped):
        sources = {source: evaluate_task(task, samples, sentence_similarity)
                   for source, samples in sorted(grouped[task].items())}
        key = TASK_SCORE_KEY[task]
        values = [m[key] for m in sources.values()]
        score = None if any(v is None for v in values) else sum(values) / len(values)
        entry = {"sources": sources, "score": score, "score_key": key,
                 "num_samples": sum(m["num_samples"] for m in sources.values()),
                 "num_unparseable": sum(m["num_unparseable"] for m in sources.values())}
        if task in ("dvc", "slc"):
            sims = [m["SentSim"] for m in sources.values()]
            entry["sentsim"] = None if any(s is None for s in sims) else sum(sims) / len(sims)
        tasks_out[task] = entry
        if entry["num_unparseable"]:
            logger.info("%s: %d of %d responses unparseable (scored as misses)", task,
                        entry["num_unparseable"], entry["num_samples"])

    if any(t in tasks_out for t in ("dvc", "slc")) and sentence_similarity is None:
        notes.append(SENTSIM_UNAVAILABLE)
    if any(t in tasks_out for t in ("rar", "eca", "rvq", "gvq")) and sentence_similarity is None:
        notes.append("Multiple-choice answers without an option letter are misses (no "
                     "sentence-similarity model for E.T. Bench's fallback).")

    merged: dict[str, float | None] = {}
    if any(t in tasks_out for t in ETBENCH_TASKS):
        for name, (members, metric) in ETBENCH_MERGED.items():
            missing = [t for t in members if t not in tasks_out]
            if missing:
                merged[name] = None
                notes.append(f"{name}: tasks {missing} absent; merged score not computed.")
                continue
            scores = [tasks_out[t]["sentsim"] if metric == "SentSim" else tasks_out[t]["score"]
                      for t in members]
            merged[name] = None if any(s is None for s in scores) else sum(scores) / len(scores)

    return {"tasks": tasks_out, "etbench_merged": merged,
            "num_samples": sum(e["num_samples"] for e in tasks_out.values()),
            "num_unparseable": sum(e["num_unparseable"] for e in tasks_out.values()),
            "notes": notes}


register(Protocol(
    name="d2vlm_jax", benchmark="any",
    summary="the project's own rules: every unusable answer a miss, deterministic, float64",
    score=lambda records, *, sentence_similarity=None, **_: evaluate_predictions(
        records, sentence_similarity)))
