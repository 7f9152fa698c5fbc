"""launch/score.py: predictions files and directories, metrics.json, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from d2vlm_jax.evaluation import records as records_lib
from d2vlm_jax.evaluation import scoring
from d2vlm_jax.evaluation.protocols import etbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE = os.path.join(ROOT, "launch", "score.py")
RECORDS = [{"idx": 0, "task": "tvg", "source": "s", "a": "0 - 10</evi> 3 - 10", "tgt": [0, 10]},
           {"idx": 1, "task": "tvg", "source": "s", "a": "none", "tgt": [0, 10]}]


def score(*args):
    return subprocess.run([sys.executable, SCORE, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_scores_a_file_and_writes_metrics_json(tmp_path):
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(RECORDS))
    out = score("--protocol", "d2vlm", "--predictions", path, "--output", tmp_path / "m.json",
                "--sentsim", "none")
    assert out.returncode == 0, out.stderr
    assert "tvg" in out.stdout and "F1" in out.stdout
    document = json.load(open(tmp_path / "m.json"))
    assert document["protocol"] == "d2vlm" and document["sample_counts"] == {"tvg": {"s": 2}}
    metrics = document["result"]["tasks"]["tvg"]["sources"]["s"]
    assert metrics["Total"] == 2 and metrics["Failed"] == 1 and metrics["F1@0.5"] == 0.5


@pytest.mark.parametrize("args, message", [
    (("--protocol", "nope"), "unknown protocol 'nope'; known: charades_timechat, d2vlm"),
    (("--protocol", "etbench", "--predictions", "/no/such.json"), "no such file"),
])
def test_one_line_errors(tmp_path, args, message):
    if "--predictions" not in args:
        (tmp_path / "p.json").write_text(json.dumps(RECORDS))
        args = args + ("--predictions", tmp_path / "p.json")
    out = score(*args)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in out.stderr


def test_malformed_json_and_missing_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    out = score("--protocol", "etbench", "--predictions", bad)
    assert out.returncode == 2 and "malformed JSON" in out.stderr
    bad.write_text(json.dumps([{"idx": 3, "task": "tem", "source": "s", "a": "1 - 2"}]))
    out = score("--protocol", "etbench", "--predictions", bad)
    assert out.returncode == 2 and "record 0, idx=3" in out.stderr and "'tgt'" in out.stderr


def test_directory_listing_follows_the_script(tmp_path):
    (tmp_path / "etbench_0.json").write_text(json.dumps(RECORDS[:1]))
    (tmp_path / "etbench_1.jsonl").write_text(json.dumps(RECORDS[1]) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"not": "records"}))
    (tmp_path / ".hidden.json").write_text("garbage")
    loaded = records_lib.load_predictions(str(tmp_path), keep=etbench.official_file_filter)
    assert sorted(r["idx"] for r in loaded) == [0, 1]  # metrics.json skipped like the script
    # the D²VLM script's filter (path != 'metrics.json') never matches a joined path
    with pytest.raises(records_lib.EvaluationInputError, match="expected a JSON list"):
        records_lib.load_predictions(str(tmp_path))


def test_sentsim_resolution_never_invents_a_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    assert scoring.resolve_similarity("auto")[0] is None
    with pytest.raises(scoring.ScoringError, match="not available"):
        scoring.resolve_similarity("minilm")
    assert scoring.resolve_similarity("none") == (None, "none")
