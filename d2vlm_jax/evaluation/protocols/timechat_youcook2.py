"""``youcook2_timechat``: YouCook2 dense captioning as the authors score it, in TimeChat format.

Re-implements ``all_benchmark_eval/youcook2/convert_result_in_timechat_format.py`` (answer
text -> ``{video: [{timestamp, caption}, ...]}``) followed by ``eval_in_timechat_format.py``
(TimeChat's copy of the densevid / vid2seq evaluator), the pipeline behind the paper's
YouCook2 F1 26.4.

Converter (records with ``task == "dvc"``, ``source == "youcook2"``): events from
:func:`authors_text.dense_events`; the key is the video file name (``video`` after the last
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

METEOR, SODA_c_2 and Para_METEOR need the user's ``meteor-1.5.jar`` (``meteor_jar``);
without it they are ``None`` and listed under ``unavailable``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

from d2vlm_jax.evaluation import authors_text, ptb_tokenizer
from d2vlm_jax.evaluation.meteor import MeteorScorer
from d2vlm_jax.evaluation.protocols import Protocol, register
from d2vlm_jax.evaluation.protocols.timechat_common import (AuthorsStops, json_object_keys,
                                                            load_json, select_records)
from d2vlm_jax.evaluation.protocols import timechat_densevid as densevid

SPLITS = {"train": 1, "val": 2, "test": 3}


def convert(records: Sequence[Mapping], stops: AuthorsStops,
            delimiter: str = authors_text.DEFAULT_DELIMITER) -> tuple[dict[str, Any], int]:
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
        parsed = authors_text.dense_events(answer, delimiter)
        if parsed.status in ("no_events", "parse_error"):
            stops.stop(parsed.status, f"{where}: dvc_format returns 2 values to a caller "
                       f"unpacking 3 {parsed.detail}".rstrip())
        video = str(record.get("video", "")).split("/")[-1]
        events = [{"timestamp": t, "caption": c}
                  for t, c in zip(parsed.timestamps, parsed.captions)]
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
          ptb_jar: str | None = None, tokenizer: str = "auto",
          delimiter: str = authors_text.DEFAULT_DELIMITER,
          strict: bool = False, seed: int = 0, **unused: Any) -> dict[str, Any]:
    """Scores E.T. Bench-layout prediction records as the authors' two scripts do.

    Args:
      records: prediction records (``task``, ``source``, ``video``, ``tgt``, ``g``, ``a``).
      sentence_similarity: unused (the TimeChat evaluator has no sentence similarity).
      ground_truth: TimeChat's ``val.caption_coco_format.json``; None = the records' own
        ``tgt``/``g`` (one video per distinct ``video``).
      meteor_jar: path of ``meteor-1.5.jar``; None = METEOR-based metrics unavailable.
      ptb_jar: path of ``stanford-corenlp-3.4.1.jar``; None = found automatically (see
        ``ptb_tokenizer.default_line_tokenizer``).
      tokenizer: ``"auto"`` (the jar when given or found, else the Python one), ``"java"``
        (the jar, an error without one) or ``"python"`` (the Python re-implementation).
      delimiter: the stage delimiter.
      strict: raise :class:`AuthorsScriptWouldStop` where the authors' scripts stop.
      seed: seed of the random strings that stand for unmatched ground truth.

    Returns:
      the evaluator's per-video means (fractions) under its names, the paragraph metrics,
      counts, the tokenizer used, ``unavailable`` and ``authors_script_would_stop``.
    """
    del sentence_similarity, unused
    selected = select_records(records, "dvc", "youcook2", "youcook2_dvc")
    stops = AuthorsStops("YouCook2 TimeChat-format scripts", strict)
    converted, empty = convert(selected, stops, delimiter)
    gt = ground_truth_from_file(ground_truth) if ground_truth else ground_truth_from_records(
        selected)
    line_tokenizer = ptb_tokenizer.make_line_tokenizer(tokenizer, ptb_jar)
    meteor = None
    unavailable = []
    if meteor_jar:
        meteor = MeteorScorer(meteor_jar)
    else:
        unavailable = ["METEOR", "SODA_c_2", "Para_METEOR"]
    rng = random.Random(seed)

    def random_caption() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20)))

    try:
        evaluator = densevid.DensevidEvaluator(line_tokenizer, meteor, stops, random_caption)
        metrics = evaluator.evaluate(converted, gt)
    finally:
        if meteor is not None:
            meteor.close()
    metrics.update(num_records=len(selected), num_empty_entries=empty,
                   num_ground_truth_videos=len(gt.keys), tokenizer=line_tokenizer.name,
                   units="fractions (the authors' script prints x100, rounded to 0.1)",
                   ground_truth=ground_truth or "records' tgt/g",
                   unavailable=unavailable)
    metrics.update(stops.report())
    return metrics


register(Protocol(
    name="youcook2_timechat", benchmark="youcook2",
    summary="YouCook2 as the authors score it: TimeChat-format converter + densevid eval",
    score=score))
