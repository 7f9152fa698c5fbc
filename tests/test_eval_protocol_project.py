"""The project's protocol (d2vlm_jax): metrics against hand-computed values, CIDEr-D,
and the task dispatcher."""

import math
import re
import sys

import numpy as np
import pytest

from d2vlm_jax.evaluation import cider, records, sentsim
from d2vlm_jax.evaluation import iou as iou_lib
from d2vlm_jax.evaluation.protocols import project as metrics


def jaccard_similarity(texts_a, texts_b):
    """Deterministic stand-in for MiniLM cosine: Jaccard of lower-case word sets."""
    out = []
    for a, b in zip(texts_a, texts_b, strict=True):
        wa, wb = set(re.findall(r"[a-z]+", a.lower())), set(re.findall(r"[a-z]+", b.lower()))
        out.append(len(wa & wb) / len(wa | wb) if wa | wb else 0.0)
    return out


# ------------------------------------------------------------------ interval basics

def test_temporal_iou_hand_values():
    assert iou_lib.temporal_iou((0, 10), (5, 15)) == pytest.approx(1 / 3)
    assert iou_lib.temporal_iou((2, 4), (0, 10)) == pytest.approx(0.2)
    assert iou_lib.temporal_iou((0, 5), (5, 9)) == 0.0
    assert iou_lib.temporal_iou((3, 3), (3, 3)) == 0.0  # empty union -> 0, not NaN
    iou = iou_lib.pairwise_temporal_iou([(0, 10), (20, 30)], [(5, 15), (0, 10), (3, 3)])
    np.testing.assert_allclose(iou, [[1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_frame_second_conversions():
    assert iou_lib.frame_interval_to_seconds(3, 8) == (3.0, 8.0)
    assert iou_lib.frame_interval_to_seconds(3, 8, fps=2.0) == (1.5, 4.0)
    assert iou_lib.frame_interval_to_seconds(1, 2, frame_times=[0.5, 1.5, 2.5]) == (1.5, 2.5)
    with pytest.raises(ValueError, match="first 4 > last 2"):
        iou_lib.frame_interval_to_seconds(4, 2)
    assert iou_lib.seconds_to_frame_interval(3.0, 7.5, num_frames=20) == (3, 8)
    assert iou_lib.seconds_to_frame_interval(2.5, 0.4, num_frames=20) == (0, 2)  # half-even
    assert iou_lib.seconds_to_frame_interval(-4, 99, num_frames=10) == (0, 9)


def test_recall_at_iou_hand_values():
    out = metrics.recall_at_iou([0.2, 0.4, None, 0.8])
    assert (out["R@0.1"], out["R@0.3"], out["R@0.5"], out["R@0.7"]) == (0.75, 0.5, 0.25, 0.25)
    assert out["mRec"] == pytest.approx(0.4375)
    assert out["mIoU"] == pytest.approx(0.35)
    assert out["num_unparseable"] == 1


def test_tal_f1_is_coverage_not_one_to_one():
    gts = [(0, 10), (20, 30)]
    assert metrics.tal_f1([(0, 10), (50, 60)], gts, 0.5) == pytest.approx(0.5)
    assert metrics.tal_f1([(40, 50)], gts, 0.1) == 0.0
    # Two predictions on the same GT both count (one-to-one matching would give 2/3).
    assert metrics.tal_f1([(0, 10), (0, 9)], [(0, 10)], 0.5) == pytest.approx(1.0)


def test_evs_f1_hand_values():
    assert metrics.evs_f1([(5, 15)], [(0, 10)]) == pytest.approx(0.5)
    # round(2.5) = 2, round(7.5) = 8 -> [2, 8) vs [0, 4): tp 2, P 2/6, R 2/4 -> 0.4
    assert metrics.evs_f1([(2.5, 7.5)], [(0, 4)]) == pytest.approx(0.4)
    assert metrics.evs_f1([(20, 30)], [(0, 4)]) == 0.0


def test_vhd_hit_and_detection():
    assert metrics.vhd_hit(10.0, [(0, 4), (10, 12)])
    assert not metrics.vhd_hit(9.99, [(0, 4), (10, 12)])
    assert not metrics.vhd_hit(None, [(0, 4)])
    # IoU exactly 0.5: not covered at t = 0.5 (strict), covered at 0.3.
    assert metrics.detection_precision_recall([(0, 10)], [(0, 20)], 0.5) == (0.0, 0.0)
    assert metrics.detection_precision_recall([(0, 10), (50, 60)], [(0, 20)], 0.3) == (0.5, 1.0)
    assert metrics.detection_precision_recall([], [(0, 20)], 0.3) == (0.0, 0.0)


def test_match_captions():
    gts = [((0, 10), "cut"), ((5, 15), "slice"), ((40, 50), "fry")]
    pairs = metrics.match_captions([((0, 10), "p1"), ((20, 30), "p2")], gts, 0.3)
    assert pairs == [("p1", "cut"), ("p1", "slice"), ("p2", None)]


# ------------------------------------------------------------------------- CIDEr-D

def test_cider_d_two_item_corpus_hand_value():
    # log|corpus| = log 2; every reference n-gram has df 1 -> weight log 2.
    # item A: identical 2-word captions: orders 1, 2 give cosine 1, orders 3, 4 give 0
    #   -> 10 * (1 + 1) / 4 = 5.0
    # item B: "c e" vs "c d": order 1 cosine L^2 / (sqrt2 L * sqrt2 L) = 0.5 -> 10*0.5/4 = 1.25
    score, per_item = cider.cider_d({"A": [["a", "b"]], "B": [["c", "d"]]},
                                    {"A": ["a", "b"], "B": ["c", "e"]})
    assert per_item["A"] == pytest.approx(5.0)
    assert per_item["B"] == pytest.approx(1.25)
    assert score == pytest.approx(3.125)


def test_cider_d_clipping_and_length_penalty():
    # item A candidate "a b a b" vs reference "a b":
    #   order 1: cand (2L, 2L), ref (L, L): sum min*ref = 2L^2, norms 2sqrt2 L, sqrt2 L -> 0.5
    #   order 2: cand {ab: 2L, ba: L}, ref {ab: L}: min(2L, L) L / (sqrt5 L * L) = 1/sqrt5
    #   orders 3, 4: no shared n-gram -> 0; bigram lengths 3 vs 1 -> penalty exp(-4/72)
    score, per_item = cider.cider_d({"A": [["a", "b"]], "B": [["c", "d"]]},
                                    {"A": ["a", "b", "a", "b"], "B": ["c", "e"]})
    expected = 10 * (0.5 + 1 / math.sqrt(5)) * math.exp(-4 / 72) / 4
    assert per_item["A"] == pytest.approx(expected)


def test_cider_d_single_item_and_shared_ngrams():
    # One item: log|corpus| = 0, every weight 0 -> 0 (as coco-caption).
    assert cider.cider_d({"A": [["a", "b"]]}, {"A": ["a", "b"]})[0] == 0.0
    # N-grams present in every reference carry no weight (df = |corpus|).
    score, per_item = cider.cider_d_text({0: ["cut the onions"], 1: ["fry the onions"]},
                                         {0: "cut the onions", 1: "fry the onions"})
    assert per_item[0] == pytest.approx(7.5) and score == pytest.approx(7.5)


def test_cider_tokenizer_and_errors():
    assert cider.tokenize_caption("The man's knife, don't drop it!") == [
        "the", "man", "'s", "knife", "do", "n't", "drop", "it"]
    assert cider.tokenize_caption("Add 2.5 cups of well-known flour.") == [
        "add", "2.5", "cups", "of", "well-known", "flour"]
    with pytest.raises(ValueError, match="same keys"):
        cider.cider_d({"A": [["a"]]}, {"B": ["a"]})
    with pytest.raises(ValueError, match="no reference"):
        cider.cider_d({"A": []}, {"A": ["a"]})


# --------------------------------------------------------------- E.T. Bench dispatcher

OPTIONS = ["the cat", "the dog", "the bird", "the fish"]


def etbench_records():
    r = []
    # TVG, source a: IoU 0.5 (hits at 0.1/0.3/0.5) + one empty answer -> F1 0.375
    r.append(dict(task="tvg", source="a", tgt=[0, 10],
                  a="0.0 - 5.0</evi> It happens at 0.0 - 5.0."))
    r.append(dict(task="tvg", source="a", tgt=[0, 10], a=""))
    # TVG, source b: perfect -> 1.0; task score = mean over sources = 0.6875
    r.append(dict(task="tvg", source="b", tgt=[0, 10], a="at 0 - 10"))
    # EPM: IoU 1/3 -> hits at 0.1, 0.3 -> 0.5
    r.append(dict(task="epm", tgt=[0, 10], a="5 - 15"))
    # TAL: coverage P = R = 1/2 at every threshold -> 0.5
    r.append(dict(task="tal", tgt=[[0, 10], [20, 30]], a="0 - 10, 50 - 60"))
    # EVS: 0.5 and one unparseable -> 0.25 (0.5 parsed only)
    r.append(dict(task="evs", tgt=[[0, 10]], a="5 - 15"))
    r.append(dict(task="evs", tgt=[[0, 10]], a="no idea"))
    # VHD: midpoint 11 misses [0, 10]; midpoint 11 hits the 2nd annotator's [10, 12] -> 0.5
    r.append(dict(task="vhd", tgt=[[0, 10]], a="8 - 14"))
    r.append(dict(task="vhd", tgt=[[[0, 4]], [[10, 12]]], a="10 - 12"))
    # RAR: hit + miss -> 0.5; EVC: hit -> 1.0; RVQ: no letter -> miss (0.0) w/o similarity
    r.append(dict(task="rar", o=OPTIONS, p=1, a="(B) the dog"))
    r.append(dict(task="rar", o=OPTIONS, p=0, a="C"))
    r.append(dict(task="evc", o=OPTIONS, p=0, a="A."))
    r.append(dict(task="rvq", o=OPTIONS, p=1, a="I think it is the dog"))
    # DVC: P = R = 1/2 at every threshold -> F1 0.5; SentSim: (1 + 0) / 2 = 0.5
    r.append(dict(task="dvc", tgt=[[0, 10], [10, 20]], g=["a man cuts onions",
                                                         "he fries the onions"],
                  a="0.0 - 10.0, a man cuts onions. 30.0 - 40.0, he washes the dishes."))
    # SLC: one perfect + one unparseable -> P = R = 1/2 -> F1 0.5; SentSim 0.5 (1.0 parsed)
    r.append(dict(task="slc", tgt=[[0, 10]], g=["a man cuts onions"],
                  a="0 - 10 seconds, a man cuts onions"))
    r.append(dict(task="slc", tgt=[[0, 10]], g=["a man cuts onions"], a="nothing here"))
    # TEM: best GT IoU 0.5 -> 0.75
    r.append(dict(task="tem", tgt=[[0, 10], [20, 30]], a="20 - 25"))
    # GVQ: right choice + IoU 1, wrong choice -> mRec 0.5, Acc 0.5
    r.append(dict(task="gvq", o=OPTIONS, p=1, tgt=[0, 10], a="(B) the dog at 0 - 10"))
    r.append(dict(task="gvq", o=OPTIONS, p=1, tgt=[0, 10], a="(A) the cat at 0 - 10"))
    return r


def test_etbench_per_task_and_merged_without_similarity():
    out = metrics.evaluate_predictions(etbench_records())
    tasks = out["tasks"]
    assert tasks["tvg"]["sources"]["a"]["F1"] == pytest.approx(0.375)
    assert tasks["tvg"]["sources"]["a"]["num_unparseable"] == 1
    assert tasks["tvg"]["score"] == pytest.approx(0.6875)
    assert tasks["epm"]["score"] == pytest.approx(0.5)
    assert tasks["tal"]["score"] == pytest.approx(0.5)
    assert tasks["evs"]["score"] == pytest.approx(0.25)
    assert tasks["evs"]["sources"]["default"]["F1_parsed_only"] == pytest.approx(0.5)
    assert tasks["vhd"]["score"] == pytest.approx(0.5)
    assert tasks["rar"]["score"] == pytest.approx(0.5)
    assert tasks["eca"]["score"] == pytest.approx(1.0)  # "evc" is an alias of "eca"
    assert tasks["rvq"]["score"] == 0.0 and tasks["rvq"]["num_unparseable"] == 1
    assert tasks["dvc"]["score"] == pytest.approx(0.5)
    assert tasks["dvc"]["sentsim"] is None
    assert tasks["slc"]["score"] == pytest.approx(0.5)
    assert tasks["tem"]["score"] == pytest.approx(0.75)
    assert tasks["gvq"]["score"] == pytest.approx(0.5)
    assert tasks["gvq"]["sources"]["default"]["Acc"] == pytest.approx(0.5)

    merged = out["etbench_merged"]
    assert merged["Acc(ref)"] == pytest.approx(0.5)
    assert merged["F1(gnd)"] == pytest.approx((0.6875 + 0.5 + 0.5 + 0.25 + 0.5) / 5)
    assert merged["F1(cap)"] == pytest.approx(0.5)
    assert merged["Sim(cap)"] is None
    assert merged["Rec(com)"] == pytest.approx(0.625)
    assert metrics.SENTSIM_UNAVAILABLE in out["notes"]
    assert out["num_samples"] == 19
    # tvg 1, evs 1, rvq 1, slc 1
    assert out["num_unparseable"] == 4


def test_etbench_with_injected_similarity():
    out = metrics.evaluate_predictions(etbench_records(), sentence_similarity=jaccard_similarity)
    tasks = out["tasks"]
    assert tasks["dvc"]["sentsim"] == pytest.approx(0.5)
    assert tasks["slc"]["sentsim"] == pytest.approx(0.5)
    assert tasks["slc"]["sources"]["default"]["SentSim_parsed_only"] == pytest.approx(1.0)
    assert out["etbench_merged"]["Sim(cap)"] == pytest.approx(0.5)
    # RVQ fallback: "i think it is the dog" is closest to "(B) the dog" -> hit, still counted
    # as unparseable (no option letter).
    assert tasks["rvq"]["score"] == 1.0 and tasks["rvq"]["num_unparseable"] == 1
    assert metrics.SENTSIM_UNAVAILABLE not in out["notes"]


def test_partial_etbench_has_no_merged_score_for_missing_tasks():
    out = metrics.evaluate_predictions([dict(task="tvg", tgt=[0, 10], a="0 - 10")])
    assert out["tasks"]["tvg"]["score"] == 1.0
    assert out["etbench_merged"]["F1(gnd)"] is None
    assert any("F1(gnd)" in note for note in out["notes"])


def test_charades_sta():
    records = [dict(task="charades_sta", tgt=[0, 10], a="0 - 5"),
               dict(task="charades_sta", tgt=[0, 10], a="0.0 - 10.0"),
               dict(task="charades_sta", tgt=[0, 10], a="sorry")]
    m = metrics.evaluate_predictions(records)["tasks"]["charades_sta"]["sources"]["default"]
    assert m["R@0.3"] == pytest.approx(2 / 3) and m["R@0.5"] == pytest.approx(2 / 3)
    assert m["R@0.7"] == pytest.approx(1 / 3)
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["num_unparseable"] == 1
    assert "R@0.1" not in m


def test_youcook2_dense_captioning():
    gts = dict(tgt=[[0, 10], [10, 20]], g=["cut the onions", "fry the onions"])
    records = [dict(task="youcook2_dvc", a="0 - 10, cut the onions. 10 - 20, fry the onions.",
                    **gts),
               dict(task="youcook2_dvc", a="", **gts)]
    m = metrics.evaluate_predictions(records)["tasks"]["youcook2_dvc"]["sources"]["default"]
    # video 1: P = R = F1 = 1 at every threshold, CIDEr 7.5 (see the CIDEr test); video 2: 0
    assert m["Precision"] == pytest.approx(0.5) and m["Recall"] == pytest.approx(0.5)
    assert m["F1"] == pytest.approx(0.5)
    assert m["CIDEr"] == pytest.approx(3.75)
    assert m["P@0.9"] == pytest.approx(0.5)
    assert m["num_unparseable"] == 1


def test_youcook2_unmatched_prediction_scores_zero_cider():
    gts = dict(tgt=[[0, 10], [10, 20]], g=["cut the onions", "fry the onions"])
    # second prediction overlaps nothing: it is paired with an empty reference.
    records = [dict(task="youcook2_dvc", a="0 - 10, cut the onions. 50 - 60, fry the onions.",
                    **gts)]
    m = metrics.evaluate_predictions(records)["tasks"]["youcook2_dvc"]["sources"]["default"]
    assert m["Precision"] == pytest.approx(0.5) and m["Recall"] == pytest.approx(0.5)
    # corpus of 2 pairs: item 0 "cut the onions" vs itself; only n-grams with df 1 count.
    # every n-gram of the reference "cut the onions" has df 1 (the other ref is empty)
    # -> cosine 1 for orders 1..3 -> 7.5; item 1 -> 0; mean 3.75.
    assert m["CIDEr"] == pytest.approx(3.75)


def test_bad_records_give_clear_errors():
    with pytest.raises(records.EvaluationInputError, match=r"record 0, idx=7.*'tgt'"):
        metrics.evaluate_predictions([dict(task="tvg", idx=7, a="0 - 1")])
    with pytest.raises(records.EvaluationInputError, match="unknown task 'xyz'"):
        metrics.evaluate_predictions([dict(task="xyz", a="")])
    with pytest.raises(records.EvaluationInputError, match="one caption per"):
        metrics.evaluate_predictions([dict(task="dvc", tgt=[[0, 1]], g=["a", "b"], a="")])
    with pytest.raises(records.EvaluationInputError, match="option index"):
        metrics.evaluate_predictions([dict(task="rar", o=OPTIONS, p=9, a="A")])
    with pytest.raises(records.EvaluationInputError, match="single interval"):
        metrics.evaluate_predictions([dict(task="tvg", tgt=[[0, 1], [2, 3]], a="0 - 1")])
    with pytest.raises(records.EvaluationInputError, match="'a'"):
        metrics.evaluate_predictions([dict(task="tvg", tgt=[0, 1])])


def test_minilm_loader_reports_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    assert sentsim.minilm_sentence_similarity() is None
