"""Protocols ``etbench`` and ``etbench_strict_rvq``: one hand-written record per rule of the
official E.T. Bench script (each expected value changes if the rule is removed)."""

import re

import numpy as np
import pytest

from d2vlm_jax.evaluation import etbench_answers as answers
from d2vlm_jax.evaluation import protocols
from d2vlm_jax.evaluation.records import EvaluationInputError


def word_similarity(texts_a, texts_b):
    """Stand-in for MiniLM: Jaccard of word sets (case-folded)."""
    out = []
    for a, b in zip(texts_a, texts_b, strict=True):
        wa, wb = set(re.findall(r"[a-z]+", a.lower())), set(re.findall(r"[a-z]+", b.lower()))
        out.append(len(wa & wb) / len(wa | wb) if wa | wb else 0.0)
    return out


def rec(task, a, k=0, source="s", **fields):
    return {"idx": k, "task": task, "source": source, "video": f"v{k}.mp4", "a": a, **fields}


def src(protocol, records, task=None, source="s", **kw):
    result = protocols.score(protocol, records, sentence_similarity=kw.pop("sim", word_similarity),
                             tokenizer="python", random_seed=0, meteor=False, **kw)
    task = task or records[0]["task"]
    return result["tasks"][task]["sources"][source]


# ------------------------------------------------------------------------- parsing

def test_grounding_interval_rules():
    assert answers.grounding_intervals("50 - 60, 0 - 10") == [[50.0, 60.0], [0.0, 10.0]]
    assert answers.grounding_intervals("10 - 0") == [[0.0, 10.0]]  # reordered
    assert answers.grounding_intervals("from 3 to 7") == [[3.0, 7.0]]  # 'to' fallback
    assert answers.grounding_intervals("from 3to 7") is None  # 'to' needs its spaces
    # keyword sentences: the first number of each candidate sentence, paired
    assert answers.grounding_intervals("It starts at 2.\nIt ends at 8.") == [[2.0, 8.0]]
    assert answers.grounding_intervals("It starts at 2 and ends at 8.") is None  # one sentence
    assert answers.grounding_intervals("start 1! end 4? start 9") == [[1.0, 4.0]]  # odd dropped
    # hh:mm:ss in candidate sentences never produce a pair (dead rule in the script)
    assert answers.grounding_intervals("starts 0:01:05") is None
    assert answers.grounding_intervals("nothing here") is None
    with pytest.raises(answers.ScriptCrash):
        answers.grounding_intervals("12.. - 15")  # float('12..') fails in the script


def test_first_number_and_dense_caption_rules():
    assert answers.first_number("peak at -3.5 or 7") == -3.5
    assert answers.first_number("+.5") == 0.5
    assert answers.first_number("none") is None
    ts, caps = answers.dense_captions("0 - 5 seconds, a man walks. 5 - 9.5 seconds, he sits.")
    assert ts == [[0.0, 5.0], [5.0, 9.5]] and caps == ["a man walks.", "he sits."]
    # a matched interval string cuts the text wherever it occurs ("1 - 2" inside "11 - 23")
    ts, caps = answers.dense_captions("11 - 23 a dog runs far. 1 - 2 a cat sleeps now")
    assert ts == [[11.0, 23.0], [1.0, 2.0]] and caps[0] == "a dog runs far."
    # start time: / end time: / description:
    ts, caps = answers.dense_captions("start time: 3 seconds end time: 8 seconds description: cooking")
    assert ts == [[3.0, 8.0]] and caps == ["cooking"]
    # fallback: a lone number -> a 40 s window; m:ss -> the same; only the first sentence
    ts, caps = answers.dense_captions("At 30 seconds the man waves. At 50 seconds he leaves.")
    assert ts == [[10.0, 50.0]] and caps == ["the man waves."]
    ts, caps = answers.dense_captions("around 0:10 a man appears on stage")
    assert ts == [[10.0, 50.0]]
    assert answers.dense_captions("no times at all in this caption") is None
    assert answers.dense_captions("1..2 - 3 crashes the paragraph parser") is None  # caught


# ----------------------------------------------------------------------- grounding

def test_tvg_first_interval_float32_and_misses():
    records = [rec("tvg", "50 - 60, 0 - 10", 0, tgt=[0, 10]),   # first interval only: miss
               rec("tvg", "3 - 10", 1, tgt=[0, 10]),            # IoU 7/10 in float32 < 0.7
               rec("tvg", "no answer", 2, tgt=[0, 10])]          # unparsed: a miss, counted
    out = src("etbench", records)
    assert out["Failed"] == 1 and out["Total"] == 3
    assert out["F1@0.5"] == round(1 / 3, 5) and out["F1@0.7"] == 0.0
    assert out["mIoU"] == round(float(np.float32(0.7)) / 3, 5)
    assert out["F1"] == round((1 / 3 + 1 / 3 + 1 / 3 + 0) / 4, 5)


def test_tvg_zero_length_union_is_nan():
    out = src("etbench", [rec("tvg", "5 - 5", tgt=[5, 5])])
    assert np.isnan(out["mIoU"]) and out["F1@0.1"] == 0.0


def test_tem_best_ground_truth():
    out = src("etbench", [rec("tem", "10 - 20", tgt=[[0, 5], [10, 20]])])
    assert out["R@0.7"] == 1.0 and out["mRec"] == 1.0


def test_tal_coverage_f1_with_float32_means():
    out = src("etbench", [rec("tal", "0 - 10, 60 - 70", tgt=[[0, 10], [20, 30], [40, 50]])])
    recall, precision = float(np.float32(1) / np.float32(3)), 0.5
    assert out["F1@0.5"] == round(2 * precision * recall / (precision + recall), 5)


def test_tal_nan_iou_crashes_the_script():
    result = protocols.score("etbench", [rec("tal", "5 - 5", tgt=[[5, 5]])])
    assert "ZeroDivisionError" in result["script_failure"]
    assert result["tasks"]["tal"]["sources"]["s"] is None


def test_evs_masks_and_parsed_only_average():
    records = [rec("evs", "0.5 - 2.5", 0, tgt=[[0, 2]]),   # round half even: [0, 2) both
               rec("evs", "nothing", 1, tgt=[[0, 2]])]
    out = src("etbench", records)
    assert out["F1"] == 1.0 and out["Failed"] == 1  # the failed sample is left out


def test_vhd_first_number():
    records = [rec("vhd", "12.5 - 40", 0, tgt=[[10, 13]]),        # 12.5 inside
               rec("vhd", "-3 then 11", 1, tgt=[[[10, 13]], [[0, 1]]])]  # -3: no annotator span
    out = src("etbench", records)
    assert out["F1"] == 0.5


# ------------------------------------------------------------------ multiple choice

OPTIONS = ["a black cat", "the dog", "a red car", "green trees"]


def cat_similarity(texts_a, texts_b):
    """Always prefers the option about a cat (option A)."""
    return [float("cat" in b) for b in texts_b]


def test_choice_letter_rules_official():
    records = [rec("rvq", "I pick (B) for sure", 0, o=OPTIONS, p=1),    # (X) anywhere
               rec("rvq", "Best option: B", 1, o=OPTIONS, p=1),         # prefix stripped
               rec("rvq", "(B", 2, o=OPTIONS, p=1),                     # "(" stripped
               rec("rvq", "B) yes", 3, o=OPTIONS, p=1),                 # separator ')'
               rec("rvq", "Bx", 4, o=OPTIONS, p=1)]                     # not a letter form
    out = src("etbench", records)
    # "Bx": no letter -> SentSim("bx", options) -> option 0 (all 0, first max) -> miss
    assert out["Acc"] == 0.8 and out["Failed"] == 1


def test_wrong_letter_second_chance_official_vs_strict():
    records = [rec("rvq", "(A) the dog", 0, o=OPTIONS, p=1)]
    assert src("etbench", records)["Acc"] == 1.0           # SentSim picks "(B) the dog"
    assert src("etbench_strict_rvq", records)["Acc"] == 0.0  # the letter is final
    # a letter that names no option falls through in both
    records = [rec("rvq", "(Z) the dog", 0, o=OPTIONS, p=1)]
    assert src("etbench_strict_rvq", records)["Acc"] == 1.0


def test_letter_set_comes_from_the_first_sample():
    five = OPTIONS + ["blue sky"]
    records = [rec("rvq", "A", 0, o=OPTIONS, p=0), rec("rvq", "E", 1, o=five, p=4)]
    # 'e' is not a letter of the source (first sample: 4 options): SentSim decides (-> A)
    assert src("etbench", records, sim=cat_similarity)["Acc"] == 0.5


def test_sentsim_unavailable_is_none_not_a_guess():
    records = [rec("rvq", "the dog", 0, o=OPTIONS, p=1)]
    out = src("etbench", records, sim=None)
    assert out["Acc"] is None and out["Acc_unavailable_samples"] == 1
    assert src("etbench", [rec("rvq", "(B)", 0, o=OPTIONS, p=1)], sim=None)["Acc"] == 1.0


def test_gvq_leading_letter_only_then_recall():
    records = [rec("gvq", "B. from 0 - 10", 0, o=OPTIONS, p=1, tgt=[0, 10]),
               rec("gvq", "I pick (B) 0 - 10", 1, o=OPTIONS, p=1, tgt=[0, 10]),  # no (X) rule
               rec("gvq", "A. 0 - 10", 2, o=OPTIONS, p=1, tgt=[0, 10])]          # wrong: final
    out = src("etbench", records, sim=cat_similarity)  # SentSim would pick A
    assert out["Acc"] == round(1 / 3, 5) and out["R@0.7"] == round(1 / 3, 5)


# ------------------------------------------------------------------- dense captions

def dvc(k, a, video=None, tgt=((0, 5), (5, 10)), g=("a man walks", "he sits down")):
    return rec("dvc", a, k, tgt=[list(t) for t in tgt], g=list(g)) | ({"video": video} if video else {})


def test_dvc_scale_duplicates_and_thresholds():
    records = [dvc(0, "0 - 5 seconds, a man walks. 5 - 10 seconds, he sits down."),
               dvc(1, "nothing"),                                   # failed: scale 1/2
               dvc(2, "0 - 4.9 seconds, a man walks.", video="v0.mp4")]  # same video: replaces #0
    out = src("etbench", records)
    assert out["Total"] == 3 and out["Failed"] == 1
    # one video left (#2): P = 1, R = 1/2 at t <= 0.9; scale = 1 video / 3 samples
    p, r = 1 / 3, 0.5 / 3
    assert out["F1@0.5"] == round(2 * p * r / (p + r), 5)


def test_dvc_sentsim_over_parsed_videos_and_seeded_random_strings():
    records = [dvc(0, "0 - 5 seconds, a man walks. 50 - 60 seconds, unmatched words."),
               dvc(1, "no answer")]
    one = protocols.score("etbench", records, sentence_similarity=word_similarity,
                          tokenizer="python", random_seed=3, meteor=False)
    two = protocols.score("etbench", records, sentence_similarity=word_similarity,
                          tokenizer="python", random_seed=3, meteor=False)
    out = one["tasks"]["dvc"]["sources"]["s"]
    assert out == two["tasks"]["dvc"]["sources"]["s"]  # seeded: reproducible
    # per threshold: pairs (walks, walks) = 1 and (unmatched, random string) = 0 -> 0.5;
    # averaged over the ONE parsed video (the failed sample is not a zero)
    assert out["SentSim"] == 0.5
    assert out["CIDEr"] >= 0 and out["Bleu_1"] > 0 and out["METEOR"] is None


# ------------------------------------------------------------------------- driver

def test_rounding_task_scores_and_positional_merge():
    records = [rec(t, "0 - 10", k, source=f"{t}1", tgt=[0, 10]) for k, t in enumerate(("tvg", "epm"))]
    records += [rec("tvg", "nothing", 5, source="tvg2", tgt=[0, 10]),
                rec("tvg", "0 - 10", 6, source="tvg2", tgt=[0, 10]),
                rec("tvg", "x", 7, source="tvg2", tgt=[0, 10])]
    result = protocols.score("etbench", records)
    assert result["tasks"]["tvg"]["sources"]["tvg2"]["F1"] == 0.33333  # 1/3 rounded
    assert result["tasks"]["tvg"]["score"] == round((1.0 + 0.33333) / 2, 5)
    # only 2 task scores: the script's merged row indexes met[8]: it would fail
    assert "IndexError" in result["script_failure"]
    assert result["printed"]["Overall"] == ["66.7", "100.0"]


def test_missing_fields_are_named():
    with pytest.raises(EvaluationInputError, match="record 0.*missing field 'tgt'"):
        protocols.score("etbench", [rec("tvg", "0 - 1")])
    with pytest.raises(EvaluationInputError, match="unknown task 'evc'"):
        protocols.score("etbench", [rec("evc", "A", o=OPTIONS, p=0)])
    with pytest.raises(EvaluationInputError, match="field 'o' must be 4 or 5"):
        protocols.score("etbench", [rec("gvq", "A", o=["x"], p=0, tgt=[0, 1])])


def test_subset_keeps_listed_samples_and_empty_sources_fail():
    records = [rec("tvg", "0 - 10", 0, source="a", tgt=[0, 10]),
               rec("tvg", "nothing", 1, source="a", tgt=[0, 10]),
               rec("tvg", "0 - 10", 2, source="b", tgt=[0, 10])]
    result = protocols.score("etbench", records, subset={"tvg": {"a": [0], "b": []}})
    assert result["tasks"]["tvg"]["sources"]["a"]["F1"] == 1.0  # idx 1 left out
    assert "tvg/b: ZeroDivisionError" in result["script_failure"]
    with pytest.raises(EvaluationInputError, match="not in the subset"):
        protocols.score("etbench", records, subset={})
