"""``youcook2_timechat``: YouCook2 dense captioning as the authors score it, in TimeChat format.

Re-implements ``all_benchmark_eval/youcook2/convert_result_in_timechat_format.py`` (answer
text -> ``{video: [{timestamp, caption}, ...]}``) followed by ``eval_in_timechat_format.py``
(TimeChat's copy of the densevid / vid2seq evaluator), the pipeline behind the paper's
YouCook2 F1 26.4.

Converter (records with ``task == "dvc"``, ``source == "youcook2"``): events from
:func:`etbench_answers.d2vlm_dense_captions` (the same ``dvc_format`` as the D²VLM E.T.
Bench script: the text between the first and second delimiter, each ``a - b`` paired with
the text piece before it, then "start time:" phrases, then the first usable line or
sentence of the *whole* answer, ``m:ss`` and lone numbers widened to 40 s); the key is the video file name (``video`` after the last
``/``; a later record of the same video replaces an earlier one). An answer without the
delimiter gets an empty list. An answer with the delimiter but no event stops the authors'
converter (``no_events`` / ``parse_error``; repair: an empty list).

Eval, per ground-truth video (videos without an entry have no prediction), every metric a
mean over the ground-truth videos (printed x100 by the script; reported here as fractions):

* detection, per IoU threshold t in (0.3, 0.5, 0.7, 0.9): a prediction and a GT segment
  *cover* each other when ``iou > t`` (strict), with ``iou = inter / (union + 1e-8)`` on
  re-ordered intervals and ``union = min(hull, len_1 + len_2)``; ``Precision@t`` = covered
  predictions / max(#predictions, 1), ``Recall@t`` = covered GT / #GT; ``Precision_Mean`` /
  ``Recall_Mean`` average the thresholds and ``F1_Score`` is their harmonic mean **per
  video** (then averaged over videos: the paper's F1);
* captions: for each prediction and threshold t, one item per GT segment with
  ``iou >= t`` (not strict), else one item against a random 10-20 letter string (scores
  ~0, but counts in the corpus size); CIDEr-D (PTB-tokenised, per video and threshold,
  its IDF from that call's references alone) and METEOR averaged over the 4 thresholds;
  0 for a video with no prediction;
* ``SODA_c_2``: SODA(c) with METEOR as the caption score; the per-prediction METEOR scores
  are placed in the order of their string keys (``"0", "1", "10", "2", ...``), not of the
  predictions, which shifts them against the IoU matrix from the 11th prediction on (a bug
  of the evaluator, reproduced); ``SODA_c_1`` is -1 for every video (there is no split 1);
* ``Para_CIDER`` / ``Para_METEOR``: the predicted paragraphs (captions joined by ". ", in
  ground-truth order, only videos with an entry) are paired **by position** with the
  ground-truth paragraphs of *all* videos, so one video without an entry shifts every
  later pair (reproduced); words are ``[a-zA-Z]`` runs, lower-cased, no PTB;
* ``n_preds``: mean number of predictions per video.

METEOR, SODA_c_2 and Para_METEOR need a ``meteor-1.5.jar`` (``meteor_jar``, else the one
of an installed ``pycocoevalcap``) and Java; without them they are ``None`` and listed
under ``unavailable``, never estimated. The PTB tokenizer is the jar when it can run
(``tokenizer="auto"``), else :mod:`d2vlm_jax.evaluation.ptb` (its Python reimplementation);
``metrics["tokenizer"]`` says which.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

from d2vlm_jax.evaluation import coco_caption, etbench_answers
from d2vlm_jax.evaluation.protocols import Protocol, register
from d2vlm_jax.evaluation.protocols.timechat_common import (DEFAULT_DELIMITER, AuthorsStops,
                                                            json_object_keys, load_json,
                                                            resolve_delimiter, result_document,
                                                            select_records)
from d2vlm_jax.evaluation.protocols import timechat_densevid as densevid

SPLITS = {"train": 1, "val": 2, "test": 3}
SCRIPTS = ("all_benchmark_eval/youcook2/convert_result_in_timechat_format.py + "
           "eval_in_timechat_format.py")
PRINTED = ("Para_CIDER", "Para_METEOR", "CIDER", "METEOR", "Precision@0.3", "Recall@0.3",
           "Precision@0.5", "Recall@0.5", "Precision@0.7", "Recall@0.7", "Precision@0.9",
           "Recall@0.9", "Precision_Mean", "Recall_Mean", "F1_Score", "SODA_c_1", "SODA_c_2",
           "SODA_c_3", "n_preds")


def convert(records: Sequence[Mapping], stops: AuthorsStops,
            delimiter: str = DEFAULT_DELIMITER) -> tuple[dict[str, Any], int]:
    """The converter: ``result_converted.json`` as read back, and the count of empty entries."""
    entries = []
    empty = 0
    for position, record in enumerate(records):
        where = f"record {position} (video {record.get('video')!r})"
        if "tgt" not in record or "g" not in record:
            stops.stop("missing_field", f"{where}: the converter reads 'tgt' and 'g'")
        answer = record.get("a")
        if not isinstance(answer, str):
            stops.stop("missing_field", f"{where}: 'a' is {type(answer).__name__}, not a string")
            answer = ""
        try:
            parsed = etbench_answers.d2vlm_dense_captions(answer, delimiter)
        except etbench_answers.ScriptCrash as error:
            stops.stop("parse_error", f"{where}: {error}")
            parsed = None
        else:
            if parsed is None and delimiter in answer:  # delimiter present, no event
                stops.stop("no_events", f"{where}: no event; dvc_format returns 2 values to "
                           "a caller unpacking 3")
        events = ([] if parsed is None else
                  [{"timestamp": t, "caption": c} for t, c in zip(parsed[0], parsed[1])])
        video = str(record.get("video", "")).split("/")[-1]
        empty += not events
        entries.append((video, events))
    return json_object_keys(entries), empty


def ground_truth_from_records(records: Sequence[Mapping]) -> densevid.GroundTruth:
    """The videos of the records (first record of each), as TimeChat's val file lists them."""
    gt = densevid.GroundTruth(split=SPLITS["val"])
    seen = set()
    for position, record in enumerate(records):
        video = str(record.get("video", "")).split("/")[-1]
        if video in seen:
            continue
        seen.add(video)
        segments, captions = record.get("tgt"), record.get("g")
        if not isinstance(segments, list) or not isinstance(captions, list):
            raise ValueError(f"record {position} (video {video!r}): the ground truth needs "
                             "'tgt' (segments) and 'g' (captions) lists, or pass TimeChat's "
                             "val.caption_coco_format.json as ground_truth")
        gt.add(video, segments, [str(c) for c in captions], where=f"record {position}")
    return gt


def ground_truth_from_file(path: str) -> densevid.GroundTruth:
    """TimeChat's ``{val,test,train}.caption_coco_format.json`` (split from the file name)."""
    split_name = path.split("/")[-1].split(".")[0]
    if split_name not in SPLITS:
        raise ValueError(f"YouCook2 ground truth {path}: the file name must start with one of "
                         f"{sorted(SPLITS)} (the evaluator reads the split from it)")
    data = load_json(path, "YouCook2 ground truth")
    gt = densevid.GroundTruth(split=SPLITS[split_name])
    for n, item in enumerate(data.get("annotations", []) if isinstance(data, dict) else []):
        try:
            if "pure_cap" in item:
                captions = item["pure_cap"].split(". ")
            else:  # ActivityNet layout
                captions = [c.strip(" ") for c in item["caption"].split(".") if len(c) > 5]
            gt.add(item["image_id"].split("/")[-1], item["segments"], captions,
                   where=f"{path} annotation {n}")
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"YouCook2 ground truth {path} annotation {n}: needs image_id, "
                             f"segments and pure_cap ({error!r})") from error
    if not gt.keys:
        raise ValueError(f"YouCook2 ground truth {path}: no 'annotations'")
    return gt


def score(records: Sequence[Mapping], *, sentence_similarity=None,
          ground_truth: str | None = None, meteor_jar: str | None = None,
          ptb_jar: str | None = None, tokenizer: str = "auto", meteor: bool = True,
          delimiter: str | None = None, strict: bool = False, random_seed: int | None = None,
          **unused: Any) -> dict[str, Any]:
    """Scores E.T. Bench-layout prediction records as the authors' two scripts do.

    Args:
      records: prediction records (``task``, ``source``, ``video``, ``tgt``, ``g``, ``a``).
      sentence_similarity: unused (the TimeChat evaluator has no sentence similarity).
      ground_truth: TimeChat's ``val.caption_coco_format.json``; None = the records' own
        ``tgt``/``g`` (one video per distinct ``video``).
      meteor_jar: a ``meteor-1.5.jar``; None = an installed ``pycocoevalcap``'s, if any.
      ptb_jar: a ``stanford-corenlp-3.4.1.jar``; None = an installed ``pycocoevalcap``'s.
      tokenizer: ``auto`` (the jar when it can run, else the Python one), ``stanford``
        (the jar, an error without one) or ``python`` (:mod:`d2vlm_jax.evaluation.ptb`).
      meteor: False = skip METEOR (and SODA_c, Para_METEOR): reported unavailable.
      delimiter: the stage delimiter (None: ``</evi>``; ``v2``/``v3``/``v4`` or text).
      strict: raise :class:`AuthorsScriptWouldStop` where the authors' scripts stop.
      random_seed: seed of the random strings standing for unmatched ground truth (the
        script's are unseeded; they score ~0 whatever their letters).

    Returns:
      the evaluator's per-video means (fractions) under its names, the paragraph metrics,
      counts, the tokenizer used, ``unavailable`` and ``authors_script_would_stop``.
    """
    del sentence_similarity, unused
    selected = select_records(records, "dvc", "youcook2", "youcook2_dvc")
    stops = AuthorsStops("YouCook2 TimeChat-format scripts", strict)
    converted, empty = convert(selected, stops, resolve_delimiter(delimiter))
    gt = ground_truth_from_file(ground_truth) if ground_truth else ground_truth_from_records(
        selected)
    caption_tokenizer = coco_caption.CaptionTokenizer(tokenizer, jar=ptb_jar)
    scorer = coco_caption.Meteor(meteor_jar) if meteor else None
    if scorer is not None and not scorer.available:
        scorer = None
    unavailable = [] if scorer else ["METEOR", "SODA_c_2", "Para_METEOR"]
    rng = random.Random(random_seed)

    def random_caption() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20)))

    try:
        evaluator = densevid.DensevidEvaluator(caption_tokenizer, scorer, stops, random_caption)
        metrics = evaluator.evaluate(converted, gt)
    finally:
        if scorer is not None:
            scorer.close()
    metrics.update(num_records=len(selected), num_empty_entries=empty,
                   num_ground_truth_videos=len(gt.keys))
    tokenizer_name = ("stanford-corenlp-3.4.1.jar" if caption_tokenizer.backend == "stanford"
                      else "python (d2vlm_jax.evaluation.ptb, a reimplementation of the jar)")
    printed = {k: (None if v is None else round(v, 1) if k == "n_preds" else round(v * 100, 1))
               for k, v in metrics.items() if k in PRINTED}
    notes = ["metrics are fractions (the authors' script prints x100, rounded to 0.1: "
             "'printed')", f"caption tokenizer: {tokenizer_name}",
             f"ground truth: {ground_truth or 'the records own tgt/g'}"]
    if unavailable:
        notes.append(f"unavailable (no METEOR jar or java, or meteor off): {', '.join(unavailable)}")
    if random_seed is None:
        notes.append("unmatched ground truth compared with unseeded random strings, as in the "
                     "script (they score ~0 whatever their letters)")
    result = result_document(metrics, benchmark="youcook2", task="dvc", source="youcook2",
                             reproduces=SCRIPTS, score_key="F1_Score", stops=stops,
                             notes=notes, printed=printed)
    result.update(tokenizer=tokenizer_name, unavailable=unavailable)
    return result


def converter_file_filter(path: str) -> bool:
    """A predictions directory's files as the authors' converter lists them: every
    ``*.json`` / ``*.jsonl`` except paths containing ``result_converted.json`` (its own
    output; its ``!= 'metrics.json'`` test compares joined paths and skips nothing)."""
    return "result_converted.json" not in path


register(Protocol(
    name="youcook2_timechat", benchmark="youcook2",
    summary="YouCook2 as the authors score it: TimeChat-format converter + densevid eval",
    score=score, keep_file=converter_file_filter))
