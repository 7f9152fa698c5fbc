"""``etbench``: the official E.T. Bench script, as the D²VLM authors ship it.

Reproduces ``all_benchmark_eval/etbench/compute_metrics_original_etchat.py`` (= E.T. Bench's
``evaluation/compute_metrics.py``) number for number. Per task, on the samples of one source:

* **TVG / EPM** -- :func:`~d2vlm_jax.evaluation.etbench_answers.grounding_intervals` of the
  whole answer; the FIRST interval's float32 IoU with ``tgt``; ``F1@t`` = share of samples
  with IoU ``>= t`` (unparsed samples count as misses), ``F1`` their mean, ``mIoU``.
* **TEM** -- the same with the max IoU over the GT intervals; ``R@t``, ``mRec``.
* **TAL** -- all intervals; per threshold, a sample whose max IoU reaches t adds
  ``2PR/(P+R)`` with coverage P/R (float32 means), others add 0; divided by all samples.
  A NaN IoU (two zero-length intervals) there divides 0 by 0: the script crashes.
* **EVS** -- per-second masks ``[round(s), round(e))`` over 1000 s; F1 averaged over the
  PARSED samples only (0 if none).
* **VHD** -- the first number in the answer (sign included) inside any GT span: hit rate.
* **RAR / ECA / RVQ** -- option letters, then the SentSim second chance (:func:`choice_eval`).
* **GVQ** -- a leading letter only (no parenthesised letter), else SentSim; then TVG-style
  recall of the first interval of the right-choice samples.
* **DVC / SLC** -- :func:`~d2vlm_jax.evaluation.etbench_answers.dense_captions`, keyed by
  video path (two samples of one video: the last one wins, the first one still counts in
  the sample total), :class:`~d2vlm_jax.evaluation.densevid.DenseCaptionEvaluation`;
  P and R are scaled by (videos with a parsed answer) / (samples) before F1; the caption
  metrics average over the parsed videos only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from d2vlm_jax.evaluation import etbench_answers as answers
from d2vlm_jax.evaluation.densevid import CAPTION_METRICS, DenseCaptionEvaluation
from d2vlm_jax.evaluation.etbench_answers import ScriptCrash
from d2vlm_jax.evaluation.iou import float32_pairwise_iou, tensor_max
from d2vlm_jax.evaluation.protocols import Protocol, register
from d2vlm_jax.evaluation.protocols import etbench_common as common
from d2vlm_jax.evaluation.protocols.etbench_common import THRESHOLDS, Context, round5

SCRIPT = "compute_metrics_original_etchat.py"


def official_file_filter(path: str) -> bool:
    """A predictions directory's files, as the official script lists them: every path that
    does not contain ``metrics`` (anywhere in the joined path)."""
    return "metrics" not in path


def float32_fraction(mask: np.ndarray) -> float:
    """``mask.float().mean().item()``: the share of True entries as a float32 value."""
    return float(np.float32(np.count_nonzero(mask)) / np.float32(mask.size))


def recall_block(samples, ious: list, prefix: str, score_key: str, failed: int) -> dict:
    """The TVG/TEM/GVQ output: hit shares at ``>= t`` over all samples, their mean, mIoU."""
    n = len(samples)
    hits = [sum(1 for iou in ious if iou >= t) for t in THRESHOLDS]
    recall = [h / n for h in hits]
    out = {"Total": n, "Failed": failed, "mIoU": round5(sum_in_order(ious) / n)}
    for value, t in zip(recall, THRESHOLDS):
        out[f"{prefix}@{t}"] = round5(value)
    out[score_key] = round5(sum(recall) / len(recall))
    return out


def sum_in_order(values) -> float:
    total = 0
    for v in values:
        total += v
    return total


def tvg_eval(samples: list, ctx: Context, *, prefix: str = "F1", score_key: str = "F1",
             best_gt: bool = False) -> dict:
    ious, failed = [], 0
    for sample in samples:
        intervals = answers.grounding_intervals(sample["a"])
        if intervals is None:
            failed += 1
            continue
        gt = sample["tgt"] if best_gt else [sample["tgt"]]
        ious.append(tensor_max(float32_pairwise_iou(gt, [intervals[0]])))
    return recall_block(samples, ious, prefix, score_key, failed)


def tem_eval(samples: list, ctx: Context) -> dict:
    return tvg_eval(samples, ctx, prefix="R", score_key="mRec", best_gt=True)


def tal_f1_sum(iou: np.ndarray, threshold: float, total: float) -> float:
    """One sample's contribution at one threshold, added to the running ``total``."""
    if tensor_max(iou) < threshold:
        return total
    recall = float32_fraction(np.max(iou, axis=1) >= threshold)
    precision = float32_fraction(np.max(iou, axis=0) >= threshold)
    if precision + recall == 0:
        raise ZeroDivisionError("TAL: 2PR/(P+R) with P = R = 0 (a NaN IoU)")
    return total + 2 * precision * recall / (precision + recall)


def tal_eval(samples: list, ctx: Context) -> dict:
    totals, failed = [0] * len(THRESHOLDS), 0
    for sample in samples:
        intervals = answers.grounding_intervals(sample["a"])
        if intervals is None:
            failed += 1
            continue
        iou = float32_pairwise_iou(sample["tgt"], intervals)
        for i, t in enumerate(THRESHOLDS):
            totals[i] = tal_f1_sum(iou, t, totals[i])
    f1 = [f / len(samples) for f in totals]
    out = {"Total": len(samples), "Failed": failed}
    for value, t in zip(f1, THRESHOLDS):
        out[f"F1@{t}"] = round5(value)
    out["F1"] = round5(sum(f1) / len(f1))
    return out


def _round_int(value) -> int:
    try:
        return round(value)
    except (OverflowError, ValueError) as error:
        raise ScriptCrash(f"round({value!r}): {error}") from None


def seconds_mask(mask: np.ndarray, intervals, value: int) -> None:
    """``mask[max(0, round(s)):round(e)] = value`` for every interval (Python slicing: a
    negative end counts from the end, reversed bounds write nothing)."""
    for interval in intervals:
        start = max(0, _round_int(interval[0]))
        end = _round_int(interval[1])
        mask[start:end] = value


def mask_f1(combined: np.ndarray) -> float:
    """F1 of a combined mask (1 = GT only, 2 = prediction only, 3 = both)."""
    tp = int(np.count_nonzero(combined == 3))
    fp = int(np.count_nonzero(combined == 2))
    fn = int(np.count_nonzero(combined == 1))
    if tp == 0:
        return 0
    recall, precision = tp / (tp + fn), tp / (tp + fp)
    return 2 * precision * recall / (precision + recall)


def evs_eval(samples: list, ctx: Context) -> dict:
    f1s, failed = [], 0
    for sample in samples:
        intervals = answers.grounding_intervals(sample["a"])
        if intervals is None:
            failed += 1
            continue
        truth = np.zeros(1000, np.int8)
        seconds_mask(truth, sample["tgt"], 1)
        predicted = np.zeros(1000, np.int8)
        seconds_mask(predicted, intervals, 2)
        f1s.append(mask_f1(truth + predicted))
    return {"Total": len(samples), "Failed": failed,
            "F1": round5(sum(f1s) / len(f1s)) if f1s else 0}


def vhd_spans(tgt) -> list:
    """VHD ground truth as a list of annotators' span lists (one annotator: wrapped)."""
    return tgt if isinstance(tgt[0][0], (list, tuple)) else [tgt]


def in_any_span(point: float, annotators) -> bool:
    return any(span[0] <= point <= span[1] for annotator in annotators for span in annotator)


def vhd_eval(samples: list, ctx: Context) -> dict:
    hits, failed = 0, 0
    for sample in samples:
        point = answers.first_number(sample["a"])
        if point is None:
            failed += 1
            continue
        hits += in_any_span(point, vhd_spans(sample["tgt"]))
    return {"Total": len(samples), "Failed": failed, "F1": round5(hits / len(samples))}


# ------------------------------------------------------------------ multiple choice

@dataclass(frozen=True)
class ChoiceRules:
    """How a script reads an option letter (RAR / ECA / RVQ).

    Attributes:
      parenthesized: ``"retry"`` -- a ``(X)`` anywhere that is a valid, right option is a
        hit, anything else falls through to the next rule (official); ``"final"`` -- a valid
        letter decides, right or wrong (strict_rvq); ``"dead"`` -- never matches (the D²VLM
        scripts test ``match.group(0)``, i.e. ``"(b)"``, against the letters).
      leading: the same for the answer's first character (after "best option:" and "(" are
        stripped; it must stand alone or be followed by ``. , space )``): ``"retry"``
        (official, d2vlm_looser: a wrong letter gets the SentSim second chance),
        ``"final"`` (strict_rvq, d2vlm).
      after_delimiter: read the text after the last delimiter (the D²VLM scripts).
      counters: also report the D²VLM scripts' ``Matched_count`` / ``matched_ratio`` /
        ``correct_ratio_within_matched``.
      found_needs: when a letter counts as "found" (a sample without one is ``Failed``):
        ``"form"`` -- any parenthesised letter or leading-letter form (official);
        ``"valid"`` -- a leading letter among the options (d2vlm); ``"right"`` -- a right
        leading letter (d2vlm_looser).
    """

    parenthesized: str = "retry"
    leading: str = "retry"
    after_delimiter: bool = False
    counters: bool = False
    found_needs: str = "form"


def choice_eval(samples: list, ctx: Context, rules: ChoiceRules) -> dict:
    num_options = len(samples[0]["o"])
    if num_options not in (4, 5):
        raise ScriptCrash(f"NotImplementedError: the first sample has {num_options} options")
    letters = "abcde"[:num_options]
    hits = failed = matched = matched_right = unavailable = 0
    for sample in samples:
        right, text = sample["p"], sample["a"]
        if rules.after_delimiter:
            text = text.split(ctx.delimiter)[-1]
        found = False
        match = answers.PARENTHESIZED_LETTER.search(text)
        if match and rules.parenthesized != "dead":
            found = True
            letter = match.group(1).lower()
            if letter in letters:
                if right == letters.index(letter):
                    hits += 1
                    continue
                if rules.parenthesized == "final":
                    continue
        text = text.lower()
        if text.startswith("best option:"):
            text = text[12:]
        text = text.lstrip().lstrip("(").lstrip()
        if not text:
            failed += 1
            continue
        if len(text) == 1 or text[1] in answers.LETTER_SEPARATORS:
            if rules.found_needs == "form":
                found = True
            if text[0] in letters:
                correct = right == letters.index(text[0])
                if rules.found_needs == "valid" or (rules.found_needs == "right" and correct):
                    found = True
                    matched += 1
                    matched_right += correct
                if correct:
                    hits += 1
                    continue
                if rules.leading == "final":
                    continue
        if ctx.similarity is None:
            unavailable += 1
            failed += not found
            continue
        choice, score = common.best_option(text, sample["o"], ctx.similarity)
        if score == float("-inf"):
            raise ScriptCrash("AssertionError: no option scored above -inf")
        failed += not found
        hits += right == choice
    n = len(samples)
    out = {"Total": n, "Failed": failed, "Acc": None if unavailable else round5(hits / n)}
    if unavailable:
        out["Acc_unavailable_samples"] = unavailable
    if rules.counters:
        out.update(Matched_count=matched, matched_ratio=matched / n,
                   correct_ratio_within_matched=matched_right / (matched + 1e-7))
    return out


OFFICIAL_CHOICE = ChoiceRules()


def rvq_eval(samples: list, ctx: Context) -> dict:
    return choice_eval(samples, ctx, OFFICIAL_CHOICE)


def gvq_choices(samples: list, ctx: Context, after_delimiter: bool):
    """GVQ's choice stage: ``(indices of right-choice samples, failed, unavailable,
    matched, matched_right)``. Only a leading letter (case kept for the SentSim text)."""
    right_choice, failed, unavailable, matched, matched_right = set(), 0, 0, 0, 0
    for index, sample in enumerate(samples):
        text = sample["a"].split(ctx.delimiter)[-1] if after_delimiter else sample["a"]
        if text.lower().startswith("best option:"):
            text = text[12:]
        text = text.lstrip().lstrip("(").lstrip()
        if not text:
            failed += 1
            continue
        letters = "abcde"[:len(sample["o"])]
        if (len(text) == 1 or text[1] in answers.LETTER_SEPARATORS) and text[0].lower() in letters:
            matched += 1
            if sample["p"] == letters.index(text[0].lower()):
                right_choice.add(index)
                matched_right += 1
            continue
        if ctx.similarity is None:
            unavailable += 1
            continue
        choice, score = common.best_option(text, sample["o"], ctx.similarity)
        if score == float("-inf"):
            failed += 1
            continue
        if sample["p"] == choice:
            right_choice.add(index)
    return right_choice, failed, unavailable, matched, matched_right


def gvq_eval(samples: list, ctx: Context) -> dict:
    right_choice, choice_failed, unavailable, _, _ = gvq_choices(samples, ctx, False)
    ious, failed = [], 0
    for index, sample in enumerate(samples):
        if index not in right_choice:
            continue
        intervals = answers.grounding_intervals(sample["a"])
        if intervals is None:
            failed += 1
            continue
        ious.append(tensor_max(float32_pairwise_iou([sample["tgt"]], [intervals[0]])))
    out = recall_block(samples, ious, "R", "mRec", failed + choice_failed)
    out["Acc"] = round5(len(right_choice) / len(samples))
    if unavailable:
        for key in out:
            if key not in ("Total", "Failed"):
                out[key] = None
        out["Acc_unavailable_samples"] = unavailable
    return out


# ------------------------------------------------------------------- dense captions

def dense_caption_output(samples: list, failed: int, scores: dict | None, scale: float,
                         evi: bool) -> dict:
    """``dvc_eval``'s output from the evaluator's per-threshold lists."""
    if scores is None:
        keys = ("Recall", "Precision", "Recall_evi", "Precision_evi") + CAPTION_METRICS
        scores = {k: [0] * len(THRESHOLDS) for k in keys}
    out = {"Total": len(samples), "Failed": failed}

    def f1_block(recall_key, precision_key, prefix):
        f1s = []
        for recall, precision, t in zip(scores[recall_key], scores[precision_key], THRESHOLDS):
            recall, precision = recall * scale, precision * scale
            f1 = 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
            out[f"{prefix}@{t}"] = round5(f1)
            f1s.append(f1)
        out[prefix] = round5(sum(f1s) / len(f1s))

    f1_block("Recall", "Precision", "F1")
    if evi:
        f1_block("Recall_evi", "Precision_evi", "F1_evi")
    for key in CAPTION_METRICS:
        out[key] = round5(common.mean(scores[key]))
    return out


def dvc_eval(samples: list, ctx: Context) -> dict:
    ground_truth, prediction, failed = {}, {}, 0
    for sample in samples:
        parsed = answers.dense_captions(sample["a"])
        if parsed is None:
            failed += 1
            continue
        timestamps, captions = parsed
        ground_truth[sample["video"]] = {"timestamps": sample["tgt"], "sentences": sample["g"]}
        prediction[sample["video"]] = [{"sentence": c, "timestamp": t}
                                       for t, c in zip(timestamps, captions)]
    scale = len(prediction) / len(samples)
    scores = None
    if ground_truth:
        scores = run_densevid(ground_truth, prediction, None, ctx)
    return dense_caption_output(samples, failed, scores, scale, evi=False)


def run_densevid(ground_truth, prediction, evidence, ctx: Context) -> dict:
    try:
        return DenseCaptionEvaluation(
            ground_truth, prediction, THRESHOLDS, evidence=evidence, similarity=ctx.similarity,
            tokenizer=ctx.tokenizer, meteor=ctx.meteor, rng=ctx.rng).evaluate()
    except (KeyError, IndexError) as error:
        raise ScriptCrash(f"DVCEval: {type(error).__name__} {error}") from None


EVALUATORS = {"tvg": tvg_eval, "epm": tvg_eval, "tem": tem_eval, "tal": tal_eval,
              "evs": evs_eval, "vhd": vhd_eval, "dvc": dvc_eval, "slc": dvc_eval,
              "rar": rvq_eval, "eca": rvq_eval, "rvq": rvq_eval, "gvq": gvq_eval}


def score(records: Sequence, *, sentence_similarity=None, tokenizer: str = "auto",
          random_seed: int | None = None, meteor: bool = True, subset=None, evaluators=None,
          reproduces: str = SCRIPT, **_) -> dict:
    return common.run(records, evaluators or EVALUATORS, reproduces=reproduces,
                      similarity=sentence_similarity, tokenizer=tokenizer, rng_seed=random_seed,
                      meteor=meteor, subset=subset,
                      delimiter="", with_evi=False)


register(Protocol(
    name="etbench", benchmark="etbench", summary="the official E.T. Bench script, exactly "
    "(compute_metrics_original_etchat.py)", score=score, keep_file=official_file_filter))
