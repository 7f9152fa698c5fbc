"""``charades_timechat`` / ``youcook2_timechat``: every rule of the authors' TimeChat-format
scripts on hand-written records (each record's expected score changes if its rule is
removed), plus property tests on random messy answers.

The protocols are also checked against the authors' scripts themselves by
``tools/crosscheck_timechat_scoring.py`` (not run here: it needs their repository, Java and
the coco-caption jars).
"""

import collections
import json
import math
import os
import random
import stat
import sys
import textwrap

import numpy as np
import pytest

from d2vlm_jax.evaluation import cider, coco_caption, etbench_answers, iou
from d2vlm_jax.evaluation import messy_timechat_records as messy
from d2vlm_jax.evaluation import protocols, ptb
from d2vlm_jax.evaluation.protocols import timechat_densevid as densevid
from d2vlm_jax.evaluation.protocols import timechat_youcook2 as youcook2
from d2vlm_jax.evaluation.protocols.timechat_common import AuthorsScriptWouldStop, AuthorsStops

PYTHON_PTB = coco_caption.CaptionTokenizer("python")
NO_JARS = {"tokenizer": "python", "meteor": False}  # unit tests never start Java


def grounding(answer, strip_trailing_dots=False):
    """The Charades converter's parse (the D²VLM ``tvg_format`` without the dot strip)."""
    return etbench_answers.d2vlm_grounding_intervals(answer, "</evi>", strip_trailing_dots)


def paragraph(text):
    return etbench_answers._paragraph_events(text, collapse_dots=True)


def dense(answer):
    return etbench_answers.d2vlm_dense_captions(answer, "</evi>")


# ============================================================ answer parsing (etbench_answers)

def test_grounding_intervals_stages_and_order():
    g = grounding
    assert g("The event happens in 3 - 7 seconds.") == (None, None)  # no delimiter
    # answer intervals are ordered, evidence intervals kept as written
    assert g("20 - 10</evi>The event happens in 9 - 4.") == ([[4.0, 9.0]], [[20.0, 10.0]])
    # several delimiters: evidence before the first, answer after the last
    assert g("1 - 2</evi>5 - 6</evi>8 - 9") == ([[8.0, 9.0]], [[1.0, 2.0]])
    assert g("1 - 2</EVI>3 - 4") == ([[3.0, 4.0]], [[1.0, 2.0]])  # case-insensitive
    assert g("</evi>nothing") == (None, None)


def test_grounding_intervals_fallbacks():
    g = grounding
    assert g("</evi>It happens from 3.5 to 7.") == ([[3.5, 7.0]], None)
    # keyword sentences are split at ! ? and newlines only, first number of each paired
    assert g("</evi>The event starts at 5! It ends at 9") == ([[5.0, 9.0]], None)
    assert g("</evi>The event starts at 5. It ends at 9") == (None, None)
    assert g("</evi>starts at 9\nends at 2") == ([[2.0, 9.0]], None)
    # clock times only ever reach the number fallback: first number of each sentence
    assert g("</evi>start time 00:01:05\nend time 00:02:00") == ([[0.0, 0.0]], None)
    assert g("</evi>no keyword 5\nnor here 9") == (None, None)


def test_grounding_intervals_numbers():
    g = grounding
    assert g("</evi>٣ - ٥") == ([[3.0, 5.0]], None)  # Unicode digits, as Python's \d and float
    assert g("</evi>" + "9" * 400 + " - 1") == ([[1.0, math.inf]], None)
    with pytest.raises(etbench_answers.ScriptCrash, match="12.."):
        g("</evi>12.. - 15")
    assert g("</evi>12.. - 15", strip_trailing_dots=True) == ([[12.0, 15.0]], None)
    with pytest.raises(etbench_answers.ScriptCrash):
        g("1..5 - 2</evi>3 - 4")  # the evidence stage is converted too


def test_paragraph_events_pairs_each_interval_with_the_piece_before_it():
    assert paragraph("0 - 10 seconds, add salt\n10 - 20 seconds, stir it") == (
        [[0.0, 10.0], [10.0, 20.0]], ["add salt", "stir it"])
    # a preamble longer than 5 characters takes the first interval's place
    assert paragraph("Here are the steps:\n0 - 10 seconds, add salt\n10 - 20 seconds, stir it"
                     )[1] == ["here are the steps:", "add salt"]
    # pieces of at most 5 characters are dropped, then both lists are truncated
    assert paragraph("0 - 10, mix\n10 - 20, stir well\n30 - 40") == ([[0.0, 10.0]], ["stir well"])
    # str.replace also cuts inside a longer match ('1 - 2' inside '11 - 22')
    assert paragraph("1 - 2 chop onion\n11 - 22 fry onion rings") == (
        [[1.0, 2.0], [11.0, 22.0]], ["chop onion", "2 fry onion rings"])
    # runs of dots become a space first
    assert paragraph("3...5 - 7 pour the milk")[0] == [[5.0, 7.0]]


def test_paragraph_events_phrase_fallbacks():
    assert paragraph("Start time: 5s, End time: 9 seconds, Description: add salt") == (
        [[5.0, 9.0]], ["add salt"])
    assert paragraph("* chop garlic start time: 5 end time: 9")[1] == [
        "chop garlic start time: 5 end time: 9"]
    with pytest.raises(etbench_answers._ParagraphError):
        paragraph("start time 5, end time 9")


def test_widened_time_part():
    w = etbench_answers._time_part
    assert w("12 - 15 x") == ["12 - 15"]
    assert w("1:30 ") == ["70 - 110"]           # m:ss, widened by 20 s
    assert w("0:10 ") == ["10 - 50"]            # t <= 20: [t, t + 40]
    assert w("1:00 to 1:30") == ["60 - 90"]     # two clock times
    assert w("35 ") == ["15.0 - 55.0"]           # a lone number (a float)
    assert w("12") == ["12.0 - 52.0"]
    assert w("4 and 9") == ["4 - 9"]
    assert w("1 2 3") == ["1", "2", "3"]         # returned as is; the caller cannot split them
    assert w("nothing") == []
    assert w("0.00001") == ["1e-05 - 40.00001"]  # Python's float repr, which the caller splits
    for bad in ("1.5:30", "a:b c", "1:2:3"):
        with pytest.raises((ValueError, IndexError)):
            w(bad)


def test_dense_captions_statuses_and_fallback():
    assert dense("0 - 10, add salt") is None  # no delimiter: an empty entry
    assert dense("1 - 2</evi>10 - 0 seconds, add the salt") == (
        [[0.0, 10.0]], ["add the salt"], [[1.0, 2.0]])
    assert dense("</evi>nothing usable here") is None  # delimiter, no event: theirs stops
    with pytest.raises(etbench_answers.ScriptCrash):
        dense("</evi>start time 5, end time 9")
    # the fallback reads lines of the WHOLE answer, the first usable one only
    assert dense("</evi>intro line\n12 seconds, add salt now\n50 seconds, stir the soup")[:2] == (
        [[12.0, 52.0]], ["add salt now"])
    # without newlines: sentences of more than 7 characters, '.' appended; the grounding
    # stage is part of the whole answer
    assert dense("5 - 9</evi>no times here")[:2] == ([[5.0, 9.0]], ["5 - 9</evi>no times here."])
    assert dense("</evi>add salt at 1:30 seconds, then stir")[:2] == ([[70.0, 110.0]], ["then stir."])
    # an unparseable candidate is skipped, not fatal
    assert dense("</evi>at 0.00001 seconds, x marks\n3 seconds, the spot")[0] == [[3.0, 43.0]]
    # only the text between the first and the second delimiter is the answer stage
    assert dense("</evi>0 - 5, add salt</evi>6 - 9, stir well")[0] == [[0.0, 5.0]]


# ============================================================ Charades-STA

def charades_record(idx, answer, tgt=(10, 20), **extra):
    record = {"idx": idx, "task": "tvg", "source": "charades_sta",
              "video": f"charades/V{idx}.mp4", "tgt": list(tgt),
              "q": "find the event described by the sentence: 'a person opens a door'.",
              "a": answer}
    record.update(extra)
    return record


def score_charades(records, **kw):
    return protocols.score("charades_timechat", records, **kw)


def test_charades_iou_is_the_eval_scripts():
    f = iou.timechat_grounding_iou
    assert f([10, 20], [15, 25]) == 5 / 15
    assert f([0, 10], [0, 7]) == 0.7  # exactly 0.7: a hit at 0.7
    assert f([10, 20], [20, 10]) == 0.0  # a reversed prediction is not re-ordered
    assert f([10, 20], [0, math.inf]) == 0.0
    with pytest.raises(ZeroDivisionError):
        f([5, 5], [5, 5])


def test_charades_recall_units_and_exact_thresholds():
    records = [charades_record(0, "1 - 2</evi>The event happens in 0 - 7 seconds.", tgt=(0, 10)),
               charades_record(1, "1 - 2</evi>The event happens in 10 - 15 seconds.", tgt=(10, 20))]
    m = score_charades(records)
    assert m["R@0.7"] == 50.0 and m["R@0.5"] == 100.0 and m["R@0.3"] == 100.0
    assert m["mIoU"] == pytest.approx((0.7 + 0.5) / 2)
    assert m["num_with_timestamp"] == 2 and m["authors_script_would_stop"] == 0


def test_charades_failures_leave_the_denominator():
    good = charades_record(0, "1 - 2</evi>10 - 20", tgt=(10, 20))
    failed = charades_record(1, "I cannot tell.", index=1)
    m = score_charades([good, failed])
    assert m["R@0.5"] == 100.0 and m["mIoU"] == 1.0  # not 50: the failure counts nowhere
    assert m["num_failed"] == 1 and m["num_with_timestamp"] == 1
    assert m["authors_script_would_stop"] == 0


def test_charades_failure_without_index_stops_the_authors_converter():
    records = [charades_record(0, "1 - 2</evi>10 - 20"), charades_record(1, "no idea")]
    with pytest.raises(AuthorsScriptWouldStop, match="failed_answer_without_index"):
        score_charades(records, strict=True)
    m = score_charades(records)
    assert m["authors_stop_reasons"] == {"failed_answer_without_index": 1}
    assert m["R@0.5"] == 100.0  # repaired: keyed by idx, scored [0, 0] out of the denominator


def test_charades_prediction_choice():
    # the first answer interval only (the second would match)
    first = charades_record(0, "1 - 2</evi>30 - 40 and 10 - 20")
    assert score_charades([first])["R@0.3"] == 0.0
    # no answer interval: the first evidence interval, as written (reversed stays reversed)
    evidence = charades_record(0, "20 - 10, 10 - 20</evi>somewhere")
    assert score_charades([evidence])["mIoU"] == 0.0
    evidence = charades_record(0, "10 - 20, 20 - 10</evi>somewhere")
    assert score_charades([evidence])["mIoU"] == 1.0


def test_charades_missing_evidence_stops_the_authors_converter():
    record = charades_record(0, "</evi>The event happens in 10 - 20 seconds.")
    with pytest.raises(AuthorsScriptWouldStop, match="no_grounding_interval"):
        score_charades([record], strict=True)
    m = score_charades([record])
    assert m["R@0.7"] == 100.0 and m["authors_stop_reasons"] == {"no_grounding_interval": 1}


def test_charades_unreadable_number_and_query_without_quote():
    record = charades_record(0, "1 - 2</evi>12.. - 20", index=0)
    with pytest.raises(AuthorsScriptWouldStop, match="unreadable_number"):
        score_charades([record], strict=True)
    m = score_charades([record, charades_record(1, "1 - 2</evi>10 - 20")])
    assert m["num_failed"] == 1 and m["R@0.5"] == 100.0
    no_quote = charades_record(0, "1 - 2</evi>10 - 20", q="find the event")
    with pytest.raises(AuthorsScriptWouldStop, match="query_without_quote"):
        score_charades([no_quote], strict=True)


def test_charades_eval_stops_repaired_to_zero():
    point = charades_record(0, "5 - 5</evi>5 - 5", tgt=(5, 5))
    with pytest.raises(AuthorsScriptWouldStop, match="zero_length_union"):
        score_charades([point], strict=True)
    everything_failed = [charades_record(0, "no", index=0)]
    with pytest.raises(AuthorsScriptWouldStop, match="no_timestamp"):
        score_charades(everything_failed, strict=True)
    m = score_charades(everything_failed)
    assert m["R@0.5"] == 0.0 and m["mIoU"] == 0.0 and m["num_with_timestamp"] == 0


def test_charades_duplicate_keys_follow_json():
    # a later record with the same idx replaces the earlier one
    assert score_charades([charades_record(0, "1 - 2</evi>10 - 20"),
                           charades_record(0, "1 - 2</evi>30 - 40")])["mIoU"] == 0.0
    # a failed record keyed by index=1 (an int) and a success keyed "1": JSON keeps one
    # "1" entry holding the value written last
    records = [charades_record(1, "1 - 2</evi>10 - 20"), charades_record(5, "no", index=1)]
    m = score_charades(records)
    assert m["num_entries"] == 1 and m["num_with_timestamp"] == 0
    records.reverse()
    m = score_charades(records)
    assert m["num_with_timestamp"] == 1 and m["R@0.5"] == 100.0


def test_charades_ground_truth_file(tmp_path):
    path = tmp_path / "test.caption_coco_format.json"
    # id 7 has no prediction (skipped), prediction idx 3 has no ground truth (counted in num)
    path.write_text(json.dumps({"annotations": [{"id": 0, "timestamp": [10, 20]},
                                                {"id": 7, "timestamp": [0, 5]}]}))
    records = [charades_record(0, "1 - 2</evi>10 - 20"), charades_record(3, "1 - 2</evi>10 - 20")]
    m = score_charades(records, ground_truth=str(path))
    assert m["R@0.5"] == 50.0 and m["num_scored"] == 1 and m["num_ground_truth"] == 2
    assert score_charades(records)["R@0.5"] == 100.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"timestamp": [1, 2]}]}))
    with pytest.raises(ValueError, match="bad.json"):
        score_charades(records, ground_truth=str(bad))


def test_charades_record_selection():
    other = {"idx": 9, "task": "tvg", "source": "qvhighlights", "a": "x", "tgt": [0, 1]}
    project = {"idx": 0, "task": "charades_sta", "video": "v", "q": "'x'", "tgt": [10, 20],
               "a": "1 - 2</evi>10 - 20"}
    assert score_charades([other, project])["num_records"] == 1
    with pytest.raises(ValueError, match="charades_sta"):
        score_charades([other])
    assert {"charades_timechat", "youcook2_timechat"} <= set(protocols.names())


# ============================================================ YouCook2 evaluator pieces

def test_densevid_iou_and_dp():
    f = iou.timechat_densevid_iou
    assert f([0, 10], [5, 15]) == 5 / (15 + 1e-8)
    assert f([10, 0], [0, 10]) == 10 / (10 + 1e-8)  # re-ordered (E.T. Bench's DVCEval does not)
    assert iou.densevid_iou([10, 0], [0, 10]) == 0.0
    assert f([3, 3], [3, 3]) == 0.0  # no division by zero (+1e-8)
    scores = np.array([[0.5, 0.9], [0.8, 0.1]])
    assert densevid.dp_assignment_score(scores) == pytest.approx(0.9)  # 0.5+0.1 < 0.9
    assert densevid.dp_assignment_score(np.array([[0.5, 0.2], [0.1, 0.7]])) == pytest.approx(1.2)


class FakeMeteor:
    """Stands in for the jar: item score 1 when hypothesis == first reference, corpus mean."""

    def __init__(self):
        self.calls = []

    def compute_score(self, references, hypotheses):
        keys = sorted(references)
        self.calls.append(keys)
        scores = np.array([float(hypotheses[k][0] == references[k][0]) for k in keys])
        return float(scores.mean()), scores


def evaluator(meteor=None):
    stops = AuthorsStops("test", strict=True)
    rng = random.Random(0)
    return densevid.DensevidEvaluator(PYTHON_PTB, meteor, stops,
                                      lambda: "".join(rng.choice("xyz") for _ in range(12)))


def gt_of(*videos):
    gt = densevid.GroundTruth(split=2)
    for key, segments, captions in videos:
        gt.add(key, segments, captions, where=key)
    return gt


def test_densevid_detection_rules():
    ev = evaluator()
    precision, recall, matrix = ev.detections([[0, 10], [0, 5], [40, 50]], [[0, 10], [20, 30]])
    # iou([0,10],[0,10]) = 10/(10+1e-8) > 0.9; iou([0,5],[0,10]) just under 0.5 (> 0.3)
    assert precision == [2 / 3, 1 / 3, 1 / 3, 1 / 3] and recall == [0.5, 0.5, 0.5, 0.5]
    assert matrix.shape == (2, 3)
    precision, recall, matrix = ev.detections([], [[0, 10]])
    assert precision == [0.0] * 4 and recall == [0.0] * 4 and matrix.shape == (1, 1)


def test_densevid_f1_is_per_video_then_averaged():
    gt = gt_of(("v1", [[0, 10]], ["add salt"]), ("v2", [[0, 10], [20, 30]], ["a b", "c d"]))
    converted = {"v1": [{"timestamp": [0, 10], "caption": "add salt"}],
                 "v2": [{"timestamp": [0, 10], "caption": "x"},
                        {"timestamp": [40, 50], "caption": "y"},
                        {"timestamp": [60, 70], "caption": "z"}]}
    m = evaluator().evaluate(converted, gt)
    f1_v2 = 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    assert m["F1_Score"] == pytest.approx((1.0 + f1_v2) / 2)
    assert m["Precision_Mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["F1_Score"] != pytest.approx(2 * m["Precision_Mean"] * m["Recall_Mean"]
                                          / (m["Precision_Mean"] + m["Recall_Mean"]))
    assert m["n_preds"] == 2.0 and m["SODA_c_1"] == -1
    assert m["METEOR"] is None and m["SODA_c_2"] is None  # no METEOR: unavailable, not 0


def test_densevid_videos_without_prediction_count_in_every_mean():
    gt = gt_of(("v1", [[0, 10]], ["add salt"]), ("v2", [[0, 10]], ["stir"]))
    m = evaluator().evaluate({"v1": [{"timestamp": [0, 10], "caption": "add salt"}]}, gt)
    assert m["Recall@0.5"] == 0.5 and m["F1_Score"] == 0.5 and m["n_preds"] == 0.5


def test_densevid_cider_is_per_video_and_threshold():
    # one prediction matching its only GT caption: each threshold's corpus has one item,
    # log(1) = 0, so CIDEr is 0 even for a perfect caption
    gt = gt_of(("v1", [[0, 10]], ["add the salt"]))
    m = evaluator().evaluate({"v1": [{"timestamp": [0, 10], "caption": "add the salt."}]}, gt)
    assert m["CIDER"] == 0.0
    # two GT segments: the corpus has two items, one a random string (scores 0 but counts)
    gt = gt_of(("v1", [[0, 10], [20, 30]], ["add the salt", "stir the soup"]))
    converted = {"v1": [{"timestamp": [0, 10], "caption": "add the salt"},
                        {"timestamp": [20, 30], "caption": "pour the milk"}]}
    m = evaluator().evaluate(converted, gt)
    refs = {"0": [["add", "the", "salt", "."]], "1": [["stir", "the", "soup", "."]]}
    hyps = {"0": ["add", "the", "salt"], "1": ["pour", "the", "milk"]}
    refs = {k: [[w for w in r if w != "."] for r in v] for k, v in refs.items()}
    assert m["CIDER"] == pytest.approx(cider.cider_d(refs, hyps)[0])


def test_densevid_paragraphs_are_paired_by_position():
    gt = gt_of(("v1", [[0, 1]], ["stir the soup"]), ("v2", [[0, 1]], ["add some salt"]),
               ("v3", [[0, 1]], ["cut two onions"]))
    converted = {"v2": [{"timestamp": [5, 6], "caption": "stir the soup"}],
                 "v3": [{"timestamp": [5, 6], "caption": "add some salt"}]}
    m = evaluator().evaluate(converted, gt)
    shifted = cider.cider_d({"0": [["stir", "the", "soup"]], "1": [["add", "some", "salt"]]},
                            {"0": ["stir", "the", "soup"], "1": ["add", "some", "salt"]})[0]
    assert m["Para_CIDER"] == pytest.approx(shifted) and shifted > 1.0


def test_densevid_soda_uses_string_key_order():
    captions = [f"step {w}" for w in ("one two three four five six seven eight nine ten "
                                      "eleven twelve").split()]  # 12 predictions
    segments = [[10 * i, 10 * i + 9] for i in range(12)]
    gt = gt_of(("v", segments, captions))
    converted = {"v": [{"timestamp": s, "caption": c} for s, c in zip(segments, captions)]}
    meteor = FakeMeteor()
    m = evaluator(meteor).evaluate(converted, gt)
    # scores come back for keys "0","1","10","11","2",...: only columns 0 and 1 line up
    # with their own prediction, so 2 of 12 diagonal scores survive
    iou = 9 / (9 + 1e-8)
    best = 2 * iou
    p, r = best / 12, best / 12
    assert m["SODA_c_2"] == pytest.approx(2 * p * r / (p + r))
    assert ["0", "1", "10", "11", "2"] == meteor.calls[-1][:5]


def test_densevid_tokenizer_line_breaks_shift_later_captions():
    table = {"a": ["Stir\rwell"], "b": ["add salt"], "c": ["(chop) it"]}
    out = PYTHON_PTB.tokenize({k: [{"caption": c} for c in v] for k, v in table.items()})
    assert out == {"a": ["stir"], "b": ["well"], "c": ["add salt"]}
    out = PYTHON_PTB.tokenize({"c": [{"caption": "(chop) it, don't!"}]})
    assert out == {"c": ["-lrb- chop -rrb- it do n't"]}  # lower-cased brackets survive


def test_ground_truth_checks(tmp_path):
    with pytest.raises(ValueError, match="2 segments but 1 captions"):
        gt_of(("v", [[0, 1], [2, 3]], ["one"]))
    with pytest.raises(ValueError, match="without segments"):
        gt_of(("v", [], []))
    bad = tmp_path / "dev.caption_coco_format.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="split"):
        youcook2.ground_truth_from_file(str(bad))
    good = tmp_path / "val.caption_coco_format.json"
    good.write_text(json.dumps({"annotations": [
        {"image_id": "dir/v1.mp4", "segments": [[0, 5], [6, 9]], "pure_cap": "add salt. stir"}]}))
    gt = youcook2.ground_truth_from_file(str(good))
    assert gt.keys == ["v1.mp4"] and gt.captions == [["add salt.", "stir."]] and gt.split == 2


# ============================================================ YouCook2 protocol end to end

def youcook2_record(idx, answer, segments=((0, 10), (20, 30)), captions=("add salt", "stir")):
    return {"idx": idx, "task": "dvc", "source": "youcook2", "video": f"yc2/vid{idx}.mp4",
            "tgt": [list(s) for s in segments], "g": list(captions), "a": answer}


def test_youcook2_end_to_end_and_stops():
    records = [youcook2_record(0, "1 - 2</evi>0 - 10 seconds, add salt\n20 - 30 seconds, stir"),
               youcook2_record(1, "no delimiter at all")]
    m = protocols.score("youcook2_timechat", records, **NO_JARS)
    assert m["F1_Score"] == pytest.approx(0.5) and m["num_empty_entries"] == 1
    assert m["unavailable"] == ["METEOR", "SODA_c_2", "Para_METEOR"] and m["METEOR"] is None
    assert m["authors_script_would_stop"] == 0 and m["script_failure"] is None
    assert m["printed"]["F1_Score"] == 50.0 and m["tasks"]["dvc"]["score"] == m["F1_Score"]
    stopping = records + [youcook2_record(2, "</evi>nothing here")]
    with pytest.raises(AuthorsScriptWouldStop, match="no_events"):
        protocols.score("youcook2_timechat", stopping, strict=True, **NO_JARS)
    m = protocols.score("youcook2_timechat", stopping, **NO_JARS)
    assert m["authors_stop_reasons"] == {"no_events": 1} and "no_events" in m["script_failure"]
    assert m["F1_Score"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="youcook2"):
        protocols.score("youcook2_timechat", [charades_record(0, "x")], **NO_JARS)


def test_youcook2_later_record_of_a_video_replaces_the_earlier():
    first = youcook2_record(0, "1 - 2</evi>0 - 10 seconds, add salt\n20 - 30 seconds, stir")
    second = dict(first, a="1 - 2</evi>50 - 60 seconds, nothing right")
    m = protocols.score("youcook2_timechat", [first, second], **NO_JARS)
    assert m["Recall_Mean"] == 0.0 and m["num_ground_truth_videos"] == 1


# ============================================================ tokenizer and METEOR plumbing

def test_python_ptb_tokenizer_matches_the_jar_on_recorded_cases():
    """Cases recorded from stanford-corenlp-3.4.1.jar (``tools/crosscheck_ptb_tokenizer.py
    --record``): caption-like text, E.T. Bench-style ASCII captions, hand-picked rule probes,
    random character soup, tricky-token sequences and multi-line texts. Every case must give
    the jar's tokens after the punctuation filter and the jar's raw output line(s)."""
    path = os.path.join(os.path.dirname(__file__), "data", "ptb_tokenizer_cases.json")
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)
    single = [case for case in cases if case["kind"] != "multiline"]
    got = PYTHON_PTB.tokenize({str(i): [{"caption": c["text"]}] for i, c in enumerate(single)})
    # (recorded in one jar call, one case a line, as coco-caption calls it: a line's trailing
    # context sees the next line)
    lines = ptb.tokenize_lines("\n".join(case["text"] for case in single))
    assert len(lines) == len(single)
    for i, case in enumerate(single):
        assert got[str(i)][0] == case["tokens"], (case["text"], case["tokens"], got[str(i)][0])
        assert lines[i] == case["line"], (case["text"], case["line"], lines[i])
    multiline = [case for case in cases if case["kind"] == "multiline"]
    for case in multiline:
        assert ptb.tokenize_lines(case["text"]) == case["lines"], case["text"]
    kinds = collections.Counter(case["kind"] for case in cases)
    assert kinds["caption"] >= 400 and kinds["rules"] >= 1000 and kinds["soup"] >= 400, kinds


def _fake_program(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_meteor_scorer_speaks_the_jar_protocol(tmp_path):
    java = _fake_program(tmp_path, "java", """
        import sys
        assert sys.argv[1:3] == ["-jar", "-Xmx2G"] and sys.argv[4:] == ["-", "-", "-stdio",
                                                                        "-l", "en", "-norm"]
        for line in sys.stdin:
            fields = line.rstrip("\\n").split(" ||| ")
            if fields[0] == "SCORE":
                hyp, refs = fields[-1], fields[1:-1]
                print(f"{int(hyp in refs)} {len(hyp.split())}", flush=True)
            else:
                stats = [s.split() for s in fields[1:]]
                for hit, _ in stats:
                    print(float(hit), flush=True)
                print(sum(float(h) * int(n) for h, n in stats) / sum(int(n) for _, n in stats),
                      flush=True)
    """)
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_text("not a jar")
    meteor = coco_caption.Meteor(str(jar), java=java)
    try:
        corpus, scores = meteor.compute_score({"c": ["z"], "b": ["a b c"], "a": ["x"]},
                                              {"c": ["q"], "b": ["a  b |||c"], "a": ["x"]})
    finally:
        meteor.close()
    # items in sorted order; '|||' removed and double spaces made single in the hypothesis;
    # the corpus score is the jar's own (here length-weighted), not the mean of the items
    assert scores.tolist() == [1.0, 1.0, 0.0] and corpus == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="not found"):
        coco_caption.Meteor(str(tmp_path / "missing.jar"))


def test_java_ptb_tokenizer_plumbing(tmp_path):
    java = _fake_program(tmp_path, "java", """
        import sys
        assert sys.argv[3:6] == ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                 "-lowerCase"]
        sys.stdout.write(open(sys.argv[6], encoding="utf-8").read().lower())
    """)
    jar = tmp_path / "stanford-corenlp-3.4.1.jar"
    jar.write_text("not a jar")
    tokenizer = coco_caption.CaptionTokenizer("stanford", jar=str(jar), java=java)
    assert tokenizer.backend == "stanford"
    out = tokenizer.tokenize({"k": [{"caption": "Add , Salt"}, {"caption": "ÉTÉ ."}]})
    assert out == {"k": ["add salt", "été"]}
    with pytest.raises(ValueError, match="not found"):
        coco_caption.CaptionTokenizer("stanford", jar=str(tmp_path / "missing.jar"))


# ============================================================ properties on messy answers

def test_messy_answers_never_break_the_parsers():
    rng = random.Random(5)
    outcomes = set()
    for _ in range(800):
        answer = messy.grounding_answer(rng) if rng.random() < 0.5 else messy.dense_answer(rng)
        try:
            pred, _ = grounding(answer)
        except etbench_answers.ScriptCrash:
            pred = None
        for interval in pred or []:
            assert interval[0] <= interval[1]
        try:
            parsed = dense(answer)
        except etbench_answers.ScriptCrash:
            outcomes.add("parse_error")
            continue
        if parsed is None:
            outcomes.add("no_events" if "</evi>" in answer else "no_delimiter")
            continue
        outcomes.add("ok")
        assert len(parsed[0]) == len(parsed[1]) and all(t[0] <= t[1] for t in parsed[0])
    assert outcomes == {"ok", "no_delimiter", "no_events", "parse_error"}


def test_charades_properties_on_messy_records():
    rng = random.Random(7)
    for trial in range(10):
        records = messy.charades_records(rng, 50, with_index=0.8)
        m = score_charades(records)
        assert 0 <= m["R@0.7"] <= m["R@0.5"] <= m["R@0.3"] <= 100
        assert 0 <= m["mIoU"] <= 1
        assert m["num_with_timestamp"] + m["num_failed"] >= m["num_entries"]
        stops = m["authors_script_would_stop"]
        if stops:
            with pytest.raises(AuthorsScriptWouldStop):
                score_charades(records, strict=True)
        else:
            assert score_charades(records, strict=True)["R@0.5"] == m["R@0.5"]
        # metamorphic: an extra failed answer (with index) changes no metric
        extra = charades_record(10_000 + trial, "no idea", index=10_000 + trial)
        again = score_charades(records + [extra])
        assert all(again[k] == m[k] for k in ("R@0.3", "R@0.5", "R@0.7", "mIoU"))


def test_youcook2_properties_on_messy_records():
    rng = random.Random(9)
    for _ in range(3):
        records = messy.youcook2_records(rng, 10)
        m = protocols.score("youcook2_timechat", records, **NO_JARS)
        for t in ("Precision", "Recall"):
            values = [m[f"{t}@{x}"] for x in (0.3, 0.5, 0.7, 0.9)]
            assert values == sorted(values, reverse=True) and 0 <= values[-1] <= values[0] <= 1
        assert 0 <= m["F1_Score"] <= 1 and m["CIDER"] >= 0 and m["Para_CIDER"] >= 0
        assert (m["authors_script_would_stop"] > 0) == bool(m["authors_stop_reasons"])


def test_score_cli_runs_the_timechat_protocols(tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    predictions = tmp_path / "charades"
    predictions.mkdir()
    (predictions / "etbench_0.json").write_text(json.dumps(
        [charades_record(0, "1 - 2</evi>10 - 20"), charades_record(1, "1 - 2</evi>0 - 4")]))
    (predictions / "result_converted.json").write_text("{}")  # their output: not read
    gt = tmp_path / "test.caption_coco_format.json"
    gt.write_text(json.dumps({"annotations": [{"id": 0, "timestamp": [10, 20]},
                                              {"id": 1, "timestamp": [10, 20]}]}))
    out = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, os.path.join(root, "launch", "score.py"),
                           "--protocol", "charades_timechat", "--predictions", str(predictions),
                           "--ground_truth", str(gt), "--output", str(out), "--strict"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    assert document["result"]["R@0.5"] == 50.0 and document["options"]["ground_truth"] == str(gt)
    assert document["result"]["printed"]["IOU 0.5"] == 50.0
    (predictions / "etbench_1.json").write_text(json.dumps([charades_record(2, "no answer")]))
    done = subprocess.run([sys.executable, os.path.join(root, "launch", "score.py"),
                           "--protocol", "charades_timechat", "--predictions", str(predictions),
                           "--strict"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "failed_answer_without_index" in done.stderr


def test_project_cider_equals_coco_caption_cider():
    """evaluation/cider.py (the project's) and coco_caption.cider (the coco-caption copy the
    TimeChat evaluator runs, crosschecked against the authors' metrics/cider_scorer.py) agree
    wherever the latter does not raise."""
    rng = random.Random(3)
    words = "a the salt pan stir add mix cut onion oil".split()
    for _ in range(200):
        n = rng.randint(1, 6)
        refs = {str(k): [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
                         for _ in range(rng.randint(1, 3))] for k in range(n)}
        hyps = {k: [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))] for k in refs}
        try:
            expected = coco_caption.cider(refs, hyps)
        except coco_caption.CiderCrash:
            continue
        ours = cider.cider_d({k: [r.split() for r in v] for k, v in refs.items()},
                             {k: v[0].split() for k, v in hyps.items()})[0]
        assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12)
