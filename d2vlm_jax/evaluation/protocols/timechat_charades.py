"""``charades_timechat``: Charades-STA as the authors score it, in TimeChat format.

Re-implements ``all_benchmark_eval/charades/convert_result_in_timechat_format.py`` (answer
text -> one timestamp per query) followed by ``eval_in_timechat_format.py`` (R@IoU, mIoU),
the pipeline behind the paper's Charades-STA R@0.5 50.3 / R@0.7 26.0.

Converter (records with ``task == "tvg"`` and ``source == "charades_sta"``, in file order):

* the answer is parsed by :func:`etbench_answers.d2vlm_grounding_intervals` (the D²VLM
  script's ``tvg_format``) *without* its trailing-dot strip, as this copy of it has none;
* the prediction is the **first** answer-stage interval, ordered; if the answer stage has
  none, the first grounding-stage (evidence) interval **as written** (possibly reversed);
* with neither, the record is a failure: an empty entry, which the eval scores as
  ``[0, 0]`` and leaves **out of the denominator**.

Eval (over the ground truth, in its order):

* ``iou(gt, pred) = max(min(g1, p1) - max(g0, p0), 0) / (max(g1, p1) - min(g0, p0))``, no
  epsilon, no re-ordering of a reversed prediction;
* a hit at threshold t is ``iou >= t``; ``R@t = 100 * hits / num`` and ``mIoU = sum(iou) /
  num`` (a fraction, as printed), where ``num`` counts the converted entries *with a
  timestamp*: failed answers add nothing to the sums and nothing to ``num``.

Where the authors' scripts stop with an exception (see ``timechat_common``):

* ``failed_answer_without_index``: a failed answer is stored under ``record["index"]``, a
  field their inference never writes (KeyError). Repair: the entry goes under ``idx``.
  A record that does have ``index`` is keyed by it, exactly as theirs.
* ``no_grounding_interval``: an answer-stage interval but no grounding-stage one
  (``torch.Tensor(None)`` in a metric they compute and discard). Repair: none needed.
* ``unreadable_number``: ``float("12..")`` in the parser. Repair: a failed answer.
* ``query_without_quote`` / ``missing_field`` / ``bad_tgt``: fields the converter reads
  but the metric does not use. Repair: ignored.
* ``zero_length_union`` (IoU 0/0) and ``no_timestamp`` (``num == 0``): repair 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from d2vlm_jax.evaluation import etbench_answers
from d2vlm_jax.evaluation.iou import timechat_grounding_iou
from d2vlm_jax.evaluation.protocols import Protocol, register
from d2vlm_jax.evaluation.protocols.timechat_common import (DEFAULT_DELIMITER, AuthorsStops,
                                                            json_object_keys, load_json,
                                                            resolve_delimiter, result_document,
                                                            select_records)

SCRIPTS = ("all_benchmark_eval/charades/convert_result_in_timechat_format.py + "
           "eval_in_timechat_format.py")
THRESHOLDS = (0.0, 0.3, 0.5, 0.7)
REPORTED_THRESHOLDS = (0.3, 0.5, 0.7)


def _is_pair(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def convert(records: Sequence[Mapping], stops: AuthorsStops,
            delimiter: str = DEFAULT_DELIMITER) -> tuple[dict[str, Any], int]:
    """The converter: ``result_converted.json`` as read back (str keys) and the failure count."""
    entries: list[tuple[Any, Any]] = []
    failures = 0
    for position, record in enumerate(records):
        where = f"record {position} (idx {record.get('idx')!r})"
        if "tgt" not in record:
            stops.stop("missing_field", f"{where}: no 'tgt'")
        answer = record.get("a")
        if not isinstance(answer, str):
            stops.stop("missing_field", f"{where}: 'a' is {type(answer).__name__}, not a string")
            answer = ""
        try:
            pred, evidence = etbench_answers.d2vlm_grounding_intervals(
                answer, delimiter, strip_trailing_dots=False)
        except etbench_answers.ScriptCrash as error:
            stops.stop("unreadable_number", f"{where}: {error}")
            pred, evidence = None, None
        if not pred:
            if not evidence:
                failures += 1
                if "index" in record:
                    entries.append((record["index"], []))
                else:
                    stops.stop("failed_answer_without_index",
                               f"{where}: a failed answer is stored under record['index']")
                    entries.append((f"{record.get('idx')}", []))
                continue
            pred = evidence
        authors_layout = record.get("task") == "tvg"  # not the project's charades_sta records
        if "idx" not in record or "video" not in record or (authors_layout and "q" not in record):
            stops.stop("missing_field", f"{where}: the converter reads 'idx', 'video' and 'q'")
        elif authors_layout and len(str(record["q"]).split("'")) < 2:
            stops.stop("query_without_quote", f"{where}: q.split(\"'\")[1] fails")
        if evidence is None:
            stops.stop("no_grounding_interval", f"{where}: torch.Tensor(None) on the evidence")
        if not _is_pair(record.get("tgt")):
            stops.stop("bad_tgt", f"{where}: tgt {record.get('tgt')!r} is not [start, end]")
        entries.append((f"{record.get('idx')}", {"timestamp": pred[0]}))
    return json_object_keys(entries), failures


def ground_truth_from_records(records: Sequence[Mapping]) -> dict[Any, Any]:
    """``{idx: tgt}``: the TimeChat test file's ``{id: timestamp}`` when ``idx`` is the
    position in that file (as the authors' ``form_json_for_etchat_inference.py`` writes it)."""
    gt: dict[Any, Any] = {}
    for position, record in enumerate(records):
        if "idx" not in record or not _is_pair(record.get("tgt")):
            raise ValueError(f"record {position}: the ground truth needs 'idx' and 'tgt' "
                             f"[start, end] (got {record.get('idx')!r}, {record.get('tgt')!r}); "
                             "or pass the TimeChat test file as ground_truth")
        gt[record["idx"]] = record["tgt"]
    return gt


def ground_truth_from_file(path: str) -> dict[Any, Any]:
    """``{id: timestamp}`` of TimeChat's ``test.caption_coco_format.json``."""
    data = load_json(path, "Charades-STA ground truth")
    try:
        return {a["id"]: a["timestamp"] for a in data["annotations"]}
    except (KeyError, TypeError) as error:
        raise ValueError(f"Charades-STA ground truth {path}: expected {{'annotations': "
                         f"[{{'id', 'timestamp'}}, ...]}} ({error!r})") from error


def evaluate(converted: Mapping[str, Any], ground_truth: Mapping[Any, Any],
             stops: AuthorsStops) -> dict[str, Any]:
    """The eval script on converted entries: R@{0.3,0.5,0.7} (percent), mIoU (fraction)."""
    predictions: dict[Any, Any] = {}
    num = 0
    for qid, entry in converted.items():
        try:
            key: Any = int(qid)
        except ValueError:
            stops.stop("non_integer_key", f"int({qid!r}) fails")
            key = qid
        if "timestamp" not in entry:
            predictions[key] = [0, 0]
            continue
        num += 1
        predictions[key] = entry["timestamp"]

    hits = {t: 0 for t in THRESHOLDS}
    iou_sum = 0.0
    scored = 0
    for key, gt in ground_truth.items():
        if key not in predictions or len(predictions[key]) < 1:
            continue
        try:
            iou = timechat_grounding_iou(gt, predictions[key])
        except ZeroDivisionError:
            stops.stop("zero_length_union", f"query {key!r}: gt {gt} and prediction "
                       f"{predictions[key]} give IoU 0/0")
            iou = 0.0
        scored += 1
        for t in THRESHOLDS:
            if iou >= t:
                hits[t] += 1
        iou_sum += iou

    metrics: dict[str, Any] = {}
    if num == 0:
        stops.stop("no_timestamp", "no converted entry has a timestamp: R@t = hits / 0")
    for t in REPORTED_THRESHOLDS:
        metrics[f"R@{t}"] = hits[t] * 100 / num if num else 0.0
    metrics["mIoU"] = iou_sum / num if num else 0.0
    metrics.update(num_entries=len(converted), num_with_timestamp=num,
                   num_ground_truth=len(ground_truth), num_scored=scored)
    return metrics


def score(records: Sequence[Mapping], *, sentence_similarity=None,
          ground_truth: str | None = None, delimiter: str | None = None,
          strict: bool = False, **unused: Any) -> dict[str, Any]:
    """Scores E.T. Bench-layout prediction records as the authors' two scripts do.

    Args:
      records: prediction records (``idx``, ``task``, ``source``, ``video``, ``q``, ``tgt``,
        ``a``); others (other tasks) are ignored, as by the authors' converter.
      sentence_similarity: unused (no caption metric).
      ground_truth: path of TimeChat's ``test.caption_coco_format.json``; None = the records'
        own ``{idx: tgt}``.
      delimiter: the stage delimiter (None: ``</evi>``, the scripts' ``v3``; ``v2`` / ``v3`` /
        ``v4`` or literal text as their ``--delimiter``).
      strict: raise :class:`AuthorsScriptWouldStop` where the authors' scripts stop.

    Returns:
      ``R@0.3``, ``R@0.5``, ``R@0.7`` in percent and ``mIoU`` as a fraction, as the eval
      script prints them; the counts behind them; ``authors_script_would_stop`` with its
      reasons; and the shared result fields (``tasks``, ``printed``, ``notes``,
      ``script_failure``).
    """
    del sentence_similarity, unused
    selected = select_records(records, "tvg", "charades_sta", "charades_sta")
    stops = AuthorsStops("Charades-STA TimeChat-format scripts", strict)
    converted, failures = convert(selected, stops, resolve_delimiter(delimiter))
    gt = (ground_truth_from_file(ground_truth) if ground_truth
          else ground_truth_from_records(selected))
    metrics = evaluate(converted, gt, stops)
    metrics.update(num_records=len(selected), num_failed=failures)
    printed = {f"IOU {t}": metrics[f"R@{t}"] for t in REPORTED_THRESHOLDS}
    printed["mIOU"] = metrics["mIoU"]
    notes = ["R@t in percent and mIoU as a fraction, as the authors' eval script prints them",
             f"ground truth: {ground_truth or 'the records own idx/tgt'}"]
    return result_document(metrics, benchmark="charades", task="tvg", source="charades_sta",
                           reproduces=SCRIPTS, score_key="R@0.5", stops=stops, notes=notes,
                           printed=printed)


def converter_file_filter(path: str) -> bool:
    """A predictions directory's files as the authors' converter lists them: every
    ``*.json`` / ``*.jsonl`` except paths containing ``result_converted`` (its own
    output; its ``!= 'metrics.json'`` test compares joined paths and skips nothing)."""
    return "result_converted" not in path


register(Protocol(
    name="charades_timechat", benchmark="charades",
    summary="Charades-STA as the authors score it: TimeChat-format converter + eval script",
    score=score, keep_file=converter_file_filter))
