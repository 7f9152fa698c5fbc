"""Protocols ``d2vlm`` and ``d2vlm_looser`` (the authors' new_compute_metrics.py and its
looser variant): one hand-written record per rule, bugs included."""

import numpy as np
import pytest

from d2vlm_jax.evaluation import etbench_answers as answers
from d2vlm_jax.evaluation import protocols
from tests.test_eval_protocol_etbench import OPTIONS, cat_similarity, rec, word_similarity


def src(protocol, records, task=None, source="s", **kw):
    result = protocols.score(protocol, records, sentence_similarity=kw.pop("sim", word_similarity),
                             tokenizer="python", random_seed=0, meteor=False, **kw)
    return result["tasks"][task or records[0]["task"]]["sources"][source]


def test_d2vlm_interval_parsing():
    parse = answers.d2vlm_grounding_intervals
    assert parse("0 - 5</evi> at 3 - 10", "</evi>") == ([[3.0, 10.0]], [[0.0, 5.0]])
    assert answers.d2vlm_grounding_intervals("at 3 - 10", "</evi>") == (None, None)  # no delimiter
    # the delimiter is matched case-insensitively here; the evidence is NOT reordered
    assert answers.d2vlm_grounding_intervals("9 - 2</EVI> 1 - 4", "</evi>") == ([[1.0, 4.0]], [[9.0, 2.0]])
    # trailing dots stripped in the answer part only
    assert answers.d2vlm_grounding_intervals("x</evi> 12.. - 15.", "</evi>")[0] == [[12.0, 15.0]]
    with pytest.raises(answers.ScriptCrash):
        answers.d2vlm_grounding_intervals("12.. - 15</evi> x", "</evi>")
    # several delimiters: grounding = first piece, answer = last piece
    assert parse("1 - 2</evi> 3 - 4</evi> 5 - 6", "</evi>") == ([[5.0, 6.0]], [[1.0, 2.0]])


def test_tvg_max_over_answer_intervals_and_evi():
    records = [rec("tvg", "40 - 50</evi> 50 - 60, 0 - 10", 0, tgt=[0, 10]),  # max over intervals
               rec("tvg", "0 - 10 the event is at 0 - 10", 1, tgt=[0, 10]),   # no delimiter: failed
               rec("tvg", "</evi> 0 - 10", 2, tgt=[0, 10])]                    # evi falls back
    out = src("d2vlm", records)
    assert out["Failed"] == 1 and out["F1@0.7"] == round(2 / 3, 5)
    assert out["F1_evi@0.7"] == round(1 / 3, 5)  # #0's grounding 40 - 50 misses, #2 reuses answer
    assert out["F1_evi"] == round(sum([1 / 3, 1 / 3, 1 / 3, 1 / 3]) / 4, 5)


def test_vhd_midpoint_of_the_answer():
    records = [rec("vhd", "0 - 2</evi> 10 - 16", 0, tgt=[[12, 14]]),   # midpoint 13: hit
               rec("vhd", "13 - 20", 1, tgt=[[12, 14]])]               # no delimiter: failed
    out = src("d2vlm", records)
    assert out["F1"] == 0.5 and out["F1_evi"] == 0.0 and out["Failed"] == 1
    assert src("etbench", records)["F1"] == 0.5  # official: first number 0 misses, 13 hits


def test_tem_first_answer_interval():
    out = src("d2vlm", [rec("tem", "x</evi> 50 - 60, 10 - 20", tgt=[[10, 20]])])
    assert out["mRec"] == 0.0 and out["mRec_evi"] == 0.0


def test_tal_reset_bug():
    gt = [[0, 10]]
    records = [rec("tal", "0 - 10</evi> 0 - 10", 0, tgt=gt),    # answer and grounding hit
               rec("tal", "80 - 90</evi> 0 - 10", 1, tgt=gt)]   # grounding misses: evi sum RESET
    out = src("d2vlm", records)
    assert out["F1@0.5"] == 1.0
    assert out["F1_evi@0.5"] == 0.0  # a correct accumulation would give 0.5


def test_evs_union_of_both_stages_and_inf_removal():
    records = [rec("evs", "10 - 20</evi> 0 - 10", 0, tgt=[[0, 10]])]
    out = src("d2vlm", records)
    # the masks are one array: prediction = union of 0-10 and 10-20 -> P = 1/2, R = 1
    assert out["F1"] == round(2 * 0.5 * 1 / 1.5, 5) == out["F1_evi"]
    inf = "9" * 400
    # [0, inf] removed while iterating, so [0, 10] right after it is skipped; the grounding
    # stage (absent) reuses the same list, now [[0, 10]]: the mask is 0-10 -> F1 1
    records = [rec("evs", f"</evi> 0 - {inf}, 0 - 10", 0, tgt=[[0, 10]])]
    assert src("d2vlm", records)["F1"] == 1.0


def test_rvq_dead_parenthesis_final_letter_and_counters():
    records = [rec("rvq", "x</evi> I think (B) the dog", 0, o=OPTIONS, p=1),  # (X) dead: SentSim
               rec("rvq", "x</evi>A. the dog", 1, o=OPTIONS, p=1),    # wrong letter: final
               rec("rvq", "B", 2, o=OPTIONS, p=1)]                    # no delimiter: whole text
    out = src("d2vlm", records, sim=cat_similarity)
    assert out["Acc"] == round(1 / 3, 5) and out["Failed"] == 1
    assert out["Matched_count"] == 2 and out["matched_ratio"] == 2 / 3
    assert out["correct_ratio_within_matched"] == 1 / (2 + 1e-7)
    looser = src("d2vlm_looser", records, sim=word_similarity)
    # looser: the wrong "A." gets SentSim("a. the dog") -> "(B) the dog": a hit
    assert looser["Acc"] == 1.0
    assert looser["Matched_count"] == 1 and looser["Failed"] == 2


def test_gvq_evidence_default_zero_interval():
    records = [rec("gvq", "x</evi> B. 0 - 10", 0, o=OPTIONS, p=1, tgt=[0, 10])]
    out = src("d2vlm", records)
    assert out["mRec"] == 1.0 and out["mRec_evi"] == 0.0  # grounding stage has no interval: [0, 0]
    assert out["Matched count"] == 1 and out["Acc"] == 1.0


def test_dvc_answer_piece_dots_and_evidence_detection():
    g = {"tgt": [[0, 5], [5, 10]], "g": ["a man walks", "he sits down"]}
    answer = "0 - 5, 5 - 10</evi> 0 - 5 seconds, a man walks... 5 - 10 seconds, he sits."
    records = [rec("dvc", answer, 0, **g)]
    out = src("d2vlm", records)
    assert out["F1@0.5"] == 1.0 and out["F1_evi@0.5"] == 1.0
    records = [rec("dvc", "70 - 80</evi> 0 - 5 seconds, a man walks.", 0, **g)]
    out = src("d2vlm", records)
    assert out["F1_evi@0.1"] == 0.0 and out["F1@0.1"] > 0
    result = protocols.score("d2vlm", [rec("dvc", "x</evi> start time 5, end time 9 cooking", 0, **g)],
                             tokenizer="python", meteor=False)
    assert "dvc_format returns 2 values" in result["script_failure"]


def test_grounding_evi_task_score_running_sum_bug():
    records = [rec("tvg", "0 - 10</evi> 0 - 10", 0, source="a", tgt=[0, 10]),
               rec("epm", "0 - 10</evi> 0 - 10", 1, source="b", tgt=[0, 10])]
    result = protocols.score("d2vlm", records, meteor=False)
    assert result["tasks"]["tvg"]["score_evi"] == 1.0
    assert result["tasks"]["epm"]["score_evi"] == 2.0  # (1 + 1) / 1: the running sum


def test_delimiter_option():
    records = [rec("tvg", "0 - 1 Answer: 0 - 10", 0, tgt=[0, 10])]
    assert src("d2vlm", records, delimiter="v2")["F1"] == 1.0
    assert src("d2vlm", records)["Failed"] == 1  # default '</evi>' absent
    with pytest.raises(ValueError):
        protocols.score("d2vlm", records, delimiter="")


def test_official_and_d2vlm_differ_where_documented():
    records = [rec("tvg", "40 - 50</evi> 0 - 10", 0, tgt=[0, 10])]
    assert src("etbench", records)["F1"] == 0.0  # official: first interval of the whole text
    assert src("d2vlm", records)["F1"] == 1.0
    assert np.isclose(src("d2vlm", records)["mIoU"], 1.0)
