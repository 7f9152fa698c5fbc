"""``d2vlm``: the authors' D²VLM scoring script, ``new_compute_metrics.py``, exactly.

The script the authors' run scripts call (``scripts/train_inference_eval.sh``), default
``--delimiter v3`` = ``</evi>``. It reads D²VLM's two-stage answers
``"<grounding stage></evi><answer>"`` and differs from the official script (protocol
``etbench``, same driver and caption evaluator) as follows:

* an answer without the delimiter is a failed sample in every task except RAR/ECA/RVQ and
  GVQ's choice stage (which read the whole text then);
* **TVG / EPM**: the max IoU over ALL answer intervals (official: the first one);
* **TEM / TAL / EVS / GVQ** parse the answer part (trailing dots stripped from numbers);
  **VHD**: the midpoint of the first interval of the answer part (official: the first
  number of the whole answer);
* ``*_evi`` metrics: the same scores computed on the grounding stage's ``a - b`` intervals
  (as written, never reordered), falling back to the answer's when it has none (GVQ: to
  ``[0, 0]``);
* **TAL**: where P = R = 0 at a threshold that the answer reaches (always so for ``_evi``
  when the grounding stage matches nothing) the running sum over the source is RESET to 0
  instead of adding 0 (bug, reproduced);
* **EVS**: the answer and grounding-stage masks are one array (``pred_map = pred_map_evi``),
  so ``F1`` and ``F1_evi`` both score the UNION of both stages' intervals (bug, reproduced);
  answer intervals ending at ``inf`` are removed while iterating the list (the next one is
  then skipped, bug reproduced);
* **RAR / ECA / RVQ**: the parenthesised-letter rule is dead (``match.group(0)``), a leading
  option letter is final, ``Failed`` counts answers without a valid leading letter, plus
  ``Matched_count`` / ``matched_ratio`` / ``correct_ratio_within_matched``;
* **DVC / SLC**: the answer part is the text between the first and second delimiter, runs
  of 2+ dots become a space, ``F1_evi`` scores the grounding stage's intervals against the
  GT; a ``start time x, end time y`` answer makes the script crash;
* the grounding-section ``F1_evi`` task scores divide a running sum over all grounding
  tasks by one task's source count (bug, reproduced in ``task_scores_evi``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from d2vlm_jax.evaluation import etbench_answers as answers
from d2vlm_jax.evaluation.iou import float32_pairwise_iou, tensor_max
from d2vlm_jax.evaluation.protocols import Protocol, etbench, register
from d2vlm_jax.evaluation.protocols import etbench_common as common
from d2vlm_jax.evaluation.protocols.etbench_common import THRESHOLDS, Context, round5

SCRIPT = "new_compute_metrics.py"
DELIMITERS = {"v2": "Answer: ", "v3": "</evi>"}
DEFAULT_DELIMITER = "</evi>"


def recall_blocks(samples, ious, ious_evi, prefix, score_key, failed, f1_evi_divisor=None) -> dict:
    """TVG / TEM / GVQ outputs with their ``_evi`` twins, in the script's key order."""
    n = len(samples)
    recall = [sum(1 for x in ious if x >= t) / n for t in THRESHOLDS]
    recall_evi = [sum(1 for x in ious_evi if x >= t) / n for t in THRESHOLDS]
    out = {"Total": n, "Failed": failed, "mIoU": round5(etbench.sum_in_order(ious) / n),
           "mIoU_evi": round5(etbench.sum_in_order(ious_evi) / n)}
    if prefix == "F1":  # TVG: F1@, F1, F1_evi@, F1_evi
        for value, t in zip(recall, THRESHOLDS):
            out[f"F1@{t}"] = round5(value)
        out["F1"] = round5(sum(recall) / len(recall))
        for value, t in zip(recall_evi, THRESHOLDS):
            out[f"F1_evi@{t}"] = round5(value)
        out["F1_evi"] = round5(sum(recall_evi) / len(recall))
        return out
    for value, t in zip(recall, THRESHOLDS):
        out[f"R@{t}"] = round5(value)
    for value, t in zip(recall_evi, THRESHOLDS):
        out[f"R_evi@{t}"] = round5(value)
    out["mRec"] = round5(sum(recall) / len(recall))
    out["mRec_evi"] = round5(sum(recall_evi) / len(recall_evi))
    return out


def tvg_eval(samples: list, ctx: Context) -> dict:
    ious, ious_evi, failed = [], [], 0
    for sample in samples:
        intervals, evidence = answers.d2vlm_grounding_intervals(sample["a"], ctx.delimiter)
        if not intervals:
            failed += 1
            continue
        evidence = evidence or intervals
        ious.append(tensor_max(float32_pairwise_iou([sample["tgt"]], intervals)))
        ious_evi.append(tensor_max(float32_pairwise_iou([sample["tgt"]], evidence)))
    return recall_blocks(samples, ious, ious_evi, "F1", "F1", failed)


def vhd_eval(samples: list, ctx: Context) -> dict:
    hits = hits_evi = failed = 0
    for sample in samples:
        pieces = sample["a"].split(ctx.delimiter)
        if len(pieces) < 2:
            failed += 1
            continue
        found = answers.grounding_intervals(pieces[-1])
        found_evi = answers.grounding_intervals(pieces[0])
        if not found:
            failed += 1
            continue
        point = (found[0][0] + found[0][1]) / 2
        point_evi = (found_evi[0][0] + found_evi[0][1]) / 2 if found_evi else point
        spans = etbench.vhd_spans(sample["tgt"])
        hits += etbench.in_any_span(point, spans)
        hits_evi += etbench.in_any_span(point_evi, spans)
    n = len(samples)
    return {"Total": n, "Failed": failed, "F1": round5(hits / n), "F1_evi": round5(hits_evi / n)}


def tem_eval(samples: list, ctx: Context) -> dict:
    ious, ious_evi, failed = [], [], 0
    for sample in samples:
        intervals, evidence = answers.d2vlm_grounding_intervals(sample["a"], ctx.delimiter)
        if intervals is None:
            failed += 1
            continue
        evidence = evidence if evidence is not None else intervals
        ious.append(tensor_max(float32_pairwise_iou(sample["tgt"], [intervals[0]])))
        ious_evi.append(tensor_max(float32_pairwise_iou(sample["tgt"], [evidence[0]])))
    return recall_blocks(samples, ious, ious_evi, "R", "mRec", failed)


def _tal_add(iou: np.ndarray, threshold: float, total):
    """One sample's term: P = R = 0 RESETS the running total to 0 (the script's bug)."""
    recall = etbench.float32_fraction(np.max(iou, axis=1) >= threshold)
    precision = etbench.float32_fraction(np.max(iou, axis=0) >= threshold)
    if recall == 0 and precision == 0:
        return 0
    return total + 2 * precision * recall / (precision + recall)


def tal_eval(samples: list, ctx: Context) -> dict:
    totals, totals_evi, failed = [0] * len(THRESHOLDS), [0] * len(THRESHOLDS), 0
    for sample in samples:
        intervals, evidence = answers.d2vlm_grounding_intervals(sample["a"], ctx.delimiter)
        if intervals is None:
            failed += 1
            continue
        evidence = evidence if evidence is not None else intervals
        iou = float32_pairwise_iou(sample["tgt"], intervals)
        iou_evi = float32_pairwise_iou(sample["tgt"], evidence)
        for i, t in enumerate(THRESHOLDS):
            if tensor_max(iou) < t:
                continue
            totals[i] = _tal_add(iou, t, totals[i])
            totals_evi[i] = _tal_add(iou_evi, t, totals_evi[i])
    n = len(samples)
    f1 = [f / n for f in totals]
    f1_evi = [f / n for f in totals_evi]
    out = {"Total": n, "Failed": failed}
    for value, t in zip(f1, THRESHOLDS):
        out[f"F1@{t}"] = round5(value)
    for value, t in zip(f1_evi, THRESHOLDS):
        out[f"F1_evi@{t}"] = round5(value)
    out["F1"] = round5(sum(f1) / len(f1))
    out["F1_evi"] = round5(sum(f1_evi) / len(f1_evi))
    return out


def _round_int(value) -> int:
    return etbench._round_int(value)


def evs_eval(samples: list, ctx: Context) -> dict:
    f1s, f1s_evi, failed = [], [], 0
    for sample in samples:
        intervals, evidence = answers.d2vlm_grounding_intervals(sample["a"], ctx.delimiter)
        if intervals is None:
            failed += 1
            continue
        if evidence is None:
            evidence = intervals  # the same list object: removals below show in both
        truth = np.zeros(1000, np.int8)
        etbench.seconds_mask(truth, sample["tgt"], 1)
        predicted = np.zeros(1000, np.int8)  # one array for both stages (the script's alias)
        for interval in intervals:  # removing while iterating skips the next interval
            start = max(0, _round_int(interval[0]))
            if math.isinf(interval[1]):
                intervals.remove(interval)
                continue
            predicted[start:_round_int(interval[1])] = 2
        for interval in evidence:
            start = max(0, _round_int(interval[0]))
            predicted[start:_round_int(interval[1])] = 2
        f1 = etbench.mask_f1(truth + predicted)
        f1s.append(f1)
        f1s_evi.append(f1)
    return {"Total": len(samples), "Failed": failed,
            "F1": round5(sum(f1s) / len(f1s)) if f1s else 0,
            "F1_evi": round5(sum(f1s_evi) / len(f1s_evi)) if f1s_evi else 0}


D2VLM_CHOICE = etbench.ChoiceRules(parenthesized="dead", leading="final", after_delimiter=True,
                                   counters=True, found_needs="valid")


def rvq_eval(samples: list, ctx: Context) -> dict:
    return etbench.choice_eval(samples, ctx, D2VLM_CHOICE)


def gvq_eval(samples: list, ctx: Context) -> dict:
    right_choice, choice_failed, unavailable, matched, matched_right = etbench.gvq_choices(
        samples, ctx, after_delimiter=True)
    ious, ious_evi, failed = [], [], 0
    for index, sample in enumerate(samples):
        if index not in right_choice:
            continue
        intervals, evidence = answers.d2vlm_grounding_intervals(sample["a"], ctx.delimiter)
        if intervals is None:
            failed += 1
            continue
        first_evi = evidence[0] if evidence else [0, 0]
        ious.append(tensor_max(float32_pairwise_iou([sample["tgt"]], [intervals[0]])))
        ious_evi.append(tensor_max(float32_pairwise_iou([sample["tgt"]], [first_evi])))
    n = len(samples)
    out = recall_blocks(samples, ious, ious_evi, "R", "mRec", failed + choice_failed)
    out["Acc"] = round5(len(right_choice) / n)
    if unavailable:
        for key in out:
            if key not in ("Total", "Failed"):
                out[key] = None
        out["Acc_unavailable_samples"] = unavailable
    out["Matched count"] = matched
    out["Matched ratio"] = matched / n
    out["correct count within matched"] = matched_right
    out["correct ratio within matched"] = matched_right / (matched + 1e-7)
    return out


def dvc_eval(samples: list, ctx: Context) -> dict:
    ground_truth, prediction, evidence, failed = {}, {}, {}, 0
    for sample in samples:
        parsed = answers.d2vlm_dense_captions(sample["a"], ctx.delimiter)
        if parsed is None:
            failed += 1
            continue
        timestamps, captions, evidence_intervals = parsed
        ground_truth[sample["video"]] = {"timestamps": sample["tgt"], "sentences": sample["g"]}
        prediction[sample["video"]] = [{"sentence": c, "timestamp": t}
                                       for t, c in zip(timestamps, captions)]
        evidence[sample["video"]] = evidence_intervals
    scale = len(prediction) / len(samples)
    scores = etbench.run_densevid(ground_truth, prediction, evidence, ctx) if ground_truth else None
    return etbench.dense_caption_output(samples, failed, scores, scale, evi=True)


EVALUATORS = {"tvg": tvg_eval, "epm": tvg_eval, "tem": tem_eval, "tal": tal_eval,
              "evs": evs_eval, "vhd": vhd_eval, "dvc": dvc_eval, "slc": dvc_eval,
              "rar": rvq_eval, "eca": rvq_eval, "rvq": rvq_eval, "gvq": gvq_eval}


def resolve_delimiter(delimiter: str | None) -> str:
    """``--delimiter`` as the script reads it: ``v2`` = "Answer: ", ``v3`` = "</evi>" (default),
    anything else literally; empty is refused (the script's ``v4`` crashes)."""
    delimiter = DEFAULT_DELIMITER if delimiter is None else DELIMITERS.get(delimiter, delimiter)
    if delimiter == "":
        raise ValueError("empty delimiter")
    return delimiter


def score(records: Sequence, *, sentence_similarity=None, tokenizer: str = "auto",
          random_seed: int | None = None, meteor: bool = True, subset=None,
          delimiter: str | None = None, evaluators=None,
          reproduces: str = SCRIPT, **_) -> dict:
    return common.run(records, evaluators or EVALUATORS, reproduces=reproduces,
                      similarity=sentence_similarity, tokenizer=tokenizer, rng_seed=random_seed,
                      meteor=meteor, subset=subset,
                      delimiter=resolve_delimiter(delimiter), with_evi=True)


register(Protocol(
    name="d2vlm", benchmark="etbench",
    summary="the authors' D²VLM script, exactly (new_compute_metrics.py, '</evi>' delimiter)",
    score=score))
