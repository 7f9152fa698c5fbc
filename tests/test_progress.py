"""Progress lines: the ETA of the stage and of the whole run, plain lines off a terminal and a
tqdm bar on one, and evaluation passes."""
from __future__ import annotations

import io

import pytest

from d2vlm_jax.train import progress as progress_lib

RATES = {"steps": 2.0, "tokens": 100.0, "frames": 10.0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_seconds():
    assert progress_lib.format_seconds(75) == "1m15s"
    assert progress_lib.format_seconds(3700) == "1h01m"
    assert progress_lib.format_seconds(float("inf")) == "?"


def test_run_eta_covers_later_stages_weighted_by_their_cost():
    stream = io.StringIO()
    plan = {"sft": (100, progress_lib.step_cost("sft", 8)), "fpo": (50, progress_lib.step_cost("fpo", 8))}
    run = progress_lib.RunProgress(plan, stream=stream)
    run.start_stage("sft", 0, 100)
    stage, whole = run.remaining_run_seconds(20, 2.0)
    # 80 SFT steps at 2 step/s; 50 FPO steps each twice the sequences of an SFT step
    assert stage == pytest.approx(40.0) and whole == pytest.approx(40.0 + 50 * 2 / 2.0)
    run.update(20, {"loss/total": 1.5, "lr/base": 1e-3}, RATES)
    line = stream.getvalue().strip()
    assert line.startswith("[sft] step 20/100 (20%) loss 1.5 lr 0.001 | 2.00 step/s")
    assert line.endswith("ETA 0m40s, all stages ~1m30s")
    run.end_stage()
    run.start_stage("fpo", 0, 50)      # the last stage: no run ETA beside the stage's
    run.update(10, {"loss/total": 1.0}, RATES)
    assert stream.getvalue().strip().splitlines()[-1].endswith("| ETA 0m20s")


def test_live_bar_on_a_terminal_and_quiet_elsewhere():
    terminal = Terminal()
    run = progress_lib.RunProgress({"sft": (10, 1.0), "fpo": (5, 2.0)}, stream=terminal)
    assert run.live
    run.start_stage("sft", 0, 10)
    run.update(5, {"loss/total": 2.0}, RATES)
    run.note("[sft] eval @ 5: tvg/R@0.5 0.5")
    run.end_stage()
    out = terminal.getvalue()
    assert "[sft]" in out and "5/10" in out and "all stages ~" in out and "[sft] eval @ 5" in out
    silent = io.StringIO()
    off = progress_lib.RunProgress({"sft": (10, 1.0)}, enabled=False, stream=silent)
    off.start_stage("sft", 0, 10)
    off.update(5, {}, RATES)
    off.note("x")
    assert silent.getvalue() == ""


def test_pass_progress_lines():
    stream = io.StringIO()
    p = progress_lib.PassProgress("[eval]", stream=stream)
    for done in (1, 2, 3):
        p(done, 3)
    lines = stream.getvalue().strip().splitlines()
    assert [x.split(" (")[0] for x in lines] == ["[eval] batch 1/3", "[eval] batch 2/3", "[eval] batch 3/3"]
    assert all("ETA" in x for x in lines)
