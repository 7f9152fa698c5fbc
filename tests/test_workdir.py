"""A workdir remembers what it was trained with: which config changes a restart applies
(recorded in the history) and which it refuses (one line naming the keys and the ways out)."""
from __future__ import annotations

import json
import os

import pytest

from tests.smoke_data import smoke_config


@pytest.fixture
def workdir(tmp_path):
    """A workdir as train/loop.py leaves it after a run: config.json + history."""
    from d2vlm_jax.train import workdir as workdir_lib
    cfg = smoke_config(tmp_path / "data")
    wd = tmp_path / "wd"
    wd.mkdir()
    plan = workdir_lib.plan_restart(str(wd), cfg)
    assert plan.event == "created"
    workdir_lib.record_start(str(wd), cfg, plan)
    return str(wd), cfg


def finish(wd, stage):
    os.makedirs(os.path.join(wd, stage), exist_ok=True)
    with open(os.path.join(wd, stage, "DONE.json"), "w") as f:
        json.dump({"stage": stage}, f)


def checkpoint_at(wd, stage, step):
    os.makedirs(os.path.join(wd, stage, "checkpoints", str(step)), exist_ok=True)
    os.makedirs(os.path.join(wd, stage, "checkpoints", f"{step + 1}.orbax-checkpoint-tmp-1"), exist_ok=True)


def changed(cfg, **updates):
    new = cfg.copy_and_resolve_references()
    for key, value in updates.items():
        node = new
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return new


def plan(wd, cfg):
    from d2vlm_jax.train import workdir as workdir_lib
    return workdir_lib.plan_restart(wd, cfg)


def test_identical_config_resumes(workdir):
    wd, cfg = workdir
    finish(wd, "sft")
    p = plan(wd, cfg)
    assert p.event == "resumed" and p.changes == () and p.stages["sft"].finished and not p.stages["fpo"].started


def test_finished_stage_refuses_more_steps_and_keeps_its_record(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    finish(wd, "sft")
    before = open(os.path.join(wd, "config.json")).read()
    with pytest.raises(workdir_lib.WorkdirConflict) as e:
        plan(wd, changed(cfg, **{"sft.steps": 6}))
    message = str(e.value)
    assert "\n" not in message and "sft.steps: 4 -> 6 (sft is finished)" in message
    assert "--workdir NEW" in message and "--overwrite" in message
    assert open(os.path.join(wd, "config.json")).read() == before


def test_model_change_after_training_names_the_key(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    finish(wd, "sft")
    with pytest.raises(workdir_lib.WorkdirConflict, match=r"model\.llm\.num_layers: 4 -> 2 \(sft trained with it\)"):
        plan(wd, changed(cfg, **{"model.llm.num_layers": 2, "log_every": 3}))


def test_safe_changes_are_applied_and_recorded(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    finish(wd, "sft")
    new = changed(cfg, **{"log_every": 7, "checkpoint.every_steps": 5, "fpo.steps": 9, "loss.fpo_beta": 0.2,
                          "eval_max_new_tokens": 20})
    p = plan(wd, new)
    assert p.event == "changed"
    assert {c.key: (c.old, c.new) for c in p.changes} == {
        "log_every": (1, 7), "checkpoint.every_steps": (2, 5), "fpo.steps": (2, 9), "loss.fpo_beta": (0.1, 0.2),
        "eval_max_new_tokens": (12, 20)}
    workdir_lib.record_start(wd, new, p)
    history = [json.loads(line) for line in open(os.path.join(wd, workdir_lib.HISTORY_FILE))]
    assert [h["event"] for h in history] == ["created", "changed"]
    assert history[1]["changes"]["fpo.steps"] == [2, 9] and history[1]["stages"]["sft"] == "finished"
    assert "time" in history[1] and history[0]["config"]["sft"]["steps"] == 4
    assert json.load(open(os.path.join(wd, "config.json")))["fpo"]["steps"] == 9
    assert plan(wd, new).event == "resumed"
    # once FPO has started, its keys are fixed too
    checkpoint_at(wd, "fpo", 2)
    with pytest.raises(workdir_lib.WorkdirConflict, match=r"loss\.fpo_beta: 0\.2 -> 0\.3 \(fpo is at step 2\)"):
        plan(wd, changed(new, **{"loss.fpo_beta": 0.3}))


def test_more_steps_on_a_started_stage_only_when_the_steps_taken_are_a_prefix(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    checkpoint_at(wd, "sft", 2)
    # the cosine schedule (and its warmup fraction) depends on the length: refused
    with pytest.raises(workdir_lib.WorkdirConflict, match="cosine schedule of 4 steps differs from that of 8"):
        plan(wd, changed(cfg, **{"sft.steps": 8}))
    # a constant schedule without warmup: the 2 steps taken are a prefix of the longer run
    constant = changed(cfg, **{"sft.optim.schedule": "constant", "sft.optim.warmup_ratio": 0.0})
    wd2 = os.path.join(os.path.dirname(wd), "wd2")
    os.makedirs(wd2)
    workdir_lib.record_start(wd2, constant, workdir_lib.plan_restart(wd2, constant))
    checkpoint_at(wd2, "sft", 2)
    p = plan(wd2, changed(constant, **{"sft.steps": 8}))
    assert [c.key for c in p.changes] == ["sft.steps"] and "prefix" in p.changes[0].reason
    with pytest.raises(workdir_lib.WorkdirConflict, match="already took 2 steps"):
        plan(wd2, changed(constant, **{"sft.steps": 1}))
    # any other key of a started stage is refused
    with pytest.raises(workdir_lib.WorkdirConflict, match=r"sft\.optim\.lr: 0\.001 -> 0\.01 \(sft is at step 2\)"):
        plan(wd, changed(cfg, **{"sft.optim.lr": 0.01}))


def test_stage_list_and_nothing_started(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    # nothing trained yet: any change is fine
    assert plan(wd, changed(cfg, **{"model.llm.num_layers": 2})).event == "changed"
    finish(wd, "sft")
    assert plan(wd, changed(cfg, stages=("sft",))).event == "changed"        # fpo not started: dropped
    with pytest.raises(workdir_lib.WorkdirConflict, match="stages"):
        plan(wd, changed(cfg, stages=("fpo",)))


def test_clear_deletes_only_the_run_and_keeps_the_history(workdir):
    from d2vlm_jax.train import workdir as workdir_lib
    wd, cfg = workdir
    finish(wd, "sft")
    os.makedirs(os.path.join(wd, "eval"))
    open(os.path.join(wd, "notes.txt"), "w").write("mine")
    removed = workdir_lib.clear(wd)
    assert sorted(os.path.basename(r) for r in removed) == ["config.json", "eval", "sft"]
    assert sorted(os.listdir(wd)) == [workdir_lib.HISTORY_FILE, "notes.txt"]
