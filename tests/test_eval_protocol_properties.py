"""Property checks of every E.T. Bench protocol on random messy records
(``d2vlm_jax.evaluation.messy_records``, also the input of tools/crosscheck_authors_scoring.py)."""

import math
import random

import pytest

from d2vlm_jax.evaluation import protocols, ptb
from d2vlm_jax.evaluation.messy_records import messy_records
from tests.test_eval_protocol_etbench import word_similarity

AUTHORS = ("etbench", "etbench_strict_rvq", "d2vlm", "d2vlm_looser")
COUNTS = {"Total", "Failed", "Matched_count", "Matched count", "correct count within matched",
          "Acc_unavailable_samples"}


def run(protocol, records, **kw):
    return protocols.score(protocol, records, sentence_similarity=word_similarity,
                           tokenizer="python", random_seed=7, meteor=False, **kw)


@pytest.fixture(scope="module")
def records():
    return messy_records(random.Random(11), per_task=12, sources=2)


@pytest.mark.parametrize("protocol", AUTHORS)
def test_messy_records_run_to_the_end_with_bounded_metrics(protocol, records):
    result = run(protocol, records)
    assert result["script_failure"] is None
    assert set(result["tasks"]) == {r["task"] for r in records}
    for task, entry in result["tasks"].items():
        for source, metrics in entry["sources"].items():
            n = sum(1 for r in records if r["task"] == task and r["source"] == source)
            assert metrics["Total"] == n and 0 <= metrics["Failed"] <= n
            for key, value in metrics.items():
                if key in COUNTS or value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if key == "score_evi":
                    continue
                assert -1e-9 <= value <= 1 + 1e-6, (task, source, key, value)
    merged = result["etbench_merged"]
    assert all(v is not None and 0 <= v <= 1 for k, v in merged.items() if k != "Sim(cap)")
    assert run(protocol, records) == result  # deterministic with a seed


def test_variants_differ_from_their_base_only_in_multiple_choice(records):
    for base, variant in (("etbench", "etbench_strict_rvq"), ("d2vlm", "d2vlm_looser")):
        a, b = run(base, records)["tasks"], run(variant, records)["tasks"]
        for task in a:
            if task not in ("rar", "eca", "rvq"):
                assert a[task] == b[task], (base, variant, task)
    strict, official = run("etbench_strict_rvq", records), run("etbench", records)
    for task in ("rar", "eca", "rvq"):  # a second chance can only add hits
        for source, m in official["tasks"][task]["sources"].items():
            assert m["Acc"] >= strict["tasks"][task]["sources"][source]["Acc"]


def test_crashing_inputs_are_reported_not_raised():
    records = messy_records(random.Random(3), per_task=25, sources=1, crashers=True)
    failures = [run(p, records)["script_failure"] for p in AUTHORS]
    assert all(f for f in failures)  # every script would stop on some of these
    assert any("float" in f for f in failures)


def test_project_protocol_on_messy_records(records):
    records = [r for r in records if r.get("tgt") != []]  # the project needs a GT interval
    result = protocols.score("d2vlm_jax", records, sentence_similarity=word_similarity)
    assert result["num_samples"] == len(records)
    for entry in result["tasks"].values():
        assert entry["score"] is None or 0 <= entry["score"] <= 1


def test_ptb_lines_are_preserved_and_known_tokens():
    rng = random.Random(0)
    # (no "@": the jar's e-mail rule lets \x0b inside a token, see below)
    alphabet = "ab c.,;:'\"()[]{}-–!?<>/\\&$%#*+=~^|_\r\x0b\x0c\t0123456789"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        lines = text.replace("\r\n", "\n")
        expected = lines.count("\n") + lines.count("\r") + lines.count("\x0b") + lines.count("\x0c") + 1
        assert len(ptb.tokenize_lines(text)) == expected
    assert ptb.tokenize_lines("A man (walks) don't</evi> at 10:00, e.g. x-ray 3-4 \"hi\"") == [
        "a man -lrb- walks -rrb- do n't </evi> at 10:00 , e.g. x-ray 3-4 `` hi ''"]
    assert ptb.tokenize_lines("can't\rgonna\x0bU.S. The end") == ["ca n't", "gon na", "u.s. . the end"]
    # a token may hold a \x0b (e-mail addresses), printed as is -- not a line break (the jar's
    # output on these two lines, stanford-corenlp-3.4.1.jar)
    assert ptb.tokenize_lines("a\x0bb@c.com\x0bd") == ["a\x0bb@c.com\x0bd"]
    assert ptb.tokenize_lines("x\x0cy@z\x0bw") == ["x", "y@z\x0bw"]
