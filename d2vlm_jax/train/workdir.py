"""What a training workdir was trained with, and which config changes a restart may apply.

Files of a workdir (next to the stage directories):

* ``config.json``: the config of the latest accepted start (``launch/infer.py`` and
  ``launch/evaluate.py`` rebuild the model and the data settings from it);
* ``config_history.jsonl``: one JSON object per accepted start, oldest first:
  ``{"time", "event", "stages", "changes"}`` (``event``: ``created``, ``resumed``,
  ``changed`` or ``overwritten``; ``changes``: ``{"a.b": [old, new]}``; the ``created``
  entry also carries the whole ``config``);
* ``<stage>/DONE.json`` of a finished stage carries the config it was trained with, and is
  never rewritten.

A restart compares the requested config with ``config.json`` key by key
(:func:`plan_restart`). Identical: resume the unfinished stage, skip the finished ones. A
change is **safe** (applied, and recorded as a ``changed`` entry) when nothing trained so
far depended on it:

* bookkeeping that never touches the parameters (:data:`ALWAYS_SAFE`): logging, checkpoint
  and in-training evaluation cadence, the final evaluation's settings;
* any key of a stage that has not started (``<stage>.*``, the FPO-only loss keys), and
  ``stages`` as long as the stages that have started keep their places;
* anything at all while no stage has started;
* ``<stage>.steps`` / ``<stage>.epochs`` of a stage that has started but not finished, **only
  when the steps already taken are exactly a prefix of the new run**: the new length is at
  least the checkpointed step and every learning rate of the steps taken is the same under
  both lengths. The cosine schedule (the default) decays over the whole length and its
  warmup is a fraction of it, so a longer cosine run takes different learning rates from
  step one: resuming it would give a model that neither run describes, and is refused. A
  constant schedule without warmup passes (its rates do not depend on the length).

Everything else is refused with one line naming the keys (old -> new) and the two ways
out: ``--workdir NEW``, or ``--overwrite`` (:func:`clear`: deletes this run's stage
directories, evaluation and ``config.json``; the history is kept and says so). A finished
stage is final, whatever changed about it: later stages and evaluations used its export.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any, Mapping

import ml_collections
import numpy as np

from d2vlm_jax import config as cfg_lib

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
STAGES = ("sft", "fpo")

#: keys that never change what is trained (exact keys or ``section.`` prefixes)
ALWAYS_SAFE = ("log_every", "eval_every", "eval_batches_during_train", "eval_batch_size", "eval_max_new_tokens",
               "final_eval", "log_example_ids", "checkpoint.", "data.eval_annotations")
#: global keys that only the FPO stage reads
FPO_ONLY = ("loss.fpo_beta", "loss.fpo_weight", "loss.fpo_reference")


class WorkdirConflict(cfg_lib.ConfigError):
    """The requested config differs from the workdir's in a way that cannot be applied."""


@dataclasses.dataclass(frozen=True)
class StageStatus:
    """``finished``: DONE.json exists; ``step``: newest complete checkpoint (0: none)."""
    finished: bool
    step: int

    @property
    def started(self) -> bool:
        return self.finished or self.step > 0

    def describe(self) -> str:
        return "finished" if self.finished else (f"at step {self.step}" if self.step else "not started")


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    safe: bool
    reason: str

    def line(self) -> str:
        return f"{self.key}: {_short(self.old)} -> {_short(self.new)}"


@dataclasses.dataclass(frozen=True)
class RestartPlan:
    """What :func:`plan_restart` decided: ``event`` for the history, the changes (all safe)."""
    event: str
    changes: tuple[Change, ...]
    stages: Mapping[str, StageStatus]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as ``config.json`` stores it (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_status(workdir: str, stage: str) -> StageStatus:
    stage_dir = os.path.join(workdir, stage)
    finished = os.path.isfile(os.path.join(stage_dir, "DONE.json"))
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    return StageStatus(finished, max(steps, default=0))


def read_stored(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirConflict(f"{path}: unreadable ({e}); use --workdir NEW or --overwrite") from None


def _owner(key: str) -> str | None:
    """The stage a key belongs to (None: every stage reads it)."""
    head = key.split(".", 1)[0]
    if head in STAGES:
        return head
    if key in FPO_ONLY:
        return "fpo"
    return None


def _steps_prefix_ok(stage: str, old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                     taken: int) -> tuple[bool, str]:
    """Whether the ``taken`` steps of ``stage`` under ``old`` are a prefix of a run under ``new``."""
    from d2vlm_jax.train import loop
    from d2vlm_jax.train import optimizer as optim_lib
    old_total = loop.resolve_steps(old[stage], loop.stage_data_config(old, old[stage]), stage)
    new_total = loop.resolve_steps(new[stage], loop.stage_data_config(new, new[stage]), stage)
    if new_total < taken:
        return False, f"{stage} already took {taken} steps"
    steps = np.arange(taken)
    _, old_schedules = optim_lib.make_optimizer(old[stage].optim, old_total)
    _, new_schedules = optim_lib.make_optimizer(new[stage].optim, new_total)
    for group in old_schedules:
        if not np.array_equal(np.asarray(old_schedules[group](steps)), np.asarray(new_schedules[group](steps))):
            return False, (f"the {new[stage].optim.get('schedule', 'cosine')} schedule of {old_total} steps "
                           f"differs from that of {new_total} steps on the {taken} steps taken")
    return True, f"{stage}: {old_total} -> {new_total} steps, the {taken} steps taken are a prefix"


def plan_restart(workdir: str, requested: ml_collections.ConfigDict) -> RestartPlan:
    """Compares ``requested`` with the workdir's ``config.json`` (module docstring).

    Returns the plan (``created`` for a new workdir); raises :class:`WorkdirConflict`
    naming every unsafe key and the ways out."""
    statuses = {stage: stage_status(workdir, stage) for stage in STAGES}
    stored = read_stored(workdir)
    if stored is None:
        return RestartPlan("created", (), statuses)
    old, new = flatten(stored), flatten(config_as_json(requested))
    keys = sorted(set(old) | set(new))
    missing = object()
    changes = []
    any_started = any(s.started for s in statuses.values())
    old_config = ml_collections.ConfigDict(stored)
    for key in keys:
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b:
            continue
        a = None if a is missing else a
        b = None if b is missing else b
        owner = _owner(key)
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in ALWAYS_SAFE):
            safe, reason = True, "bookkeeping only"
        elif not any_started:
            safe, reason = True, "no stage has started"
        elif key == "stages":
            started = [s for s in (a or []) if statuses.get(s, StageStatus(False, 0)).started]
            safe = list(b or [])[:len(started)] == started
            reason = "the started stages keep their places" if safe else f"stages {started} have started"
        elif owner is not None and not statuses[owner].started:
            safe, reason = True, f"{owner} has not started"
        elif owner is not None and statuses[owner].finished:
            safe, reason = False, f"{owner} is finished"
        elif owner is not None and key in (f"{owner}.steps", f"{owner}.epochs"):
            safe, reason = _steps_prefix_ok(owner, old_config, requested, statuses[owner].step)
        elif owner is not None:
            safe, reason = False, f"{owner} is at step {statuses[owner].step}"
        else:
            started = [s for s, st in statuses.items() if st.started]
            safe, reason = False, f"{', '.join(started)} trained with it"
        changes.append(Change(key, a, b, safe, reason))
    unsafe = [c for c in changes if not c.safe]
    if unsafe:
        shown = "; ".join(f"{c.line()} ({c.reason})" for c in unsafe[:6])
        more = f"; and {len(unsafe) - 6} more" if len(unsafe) > 6 else ""
        raise WorkdirConflict(
            f"workdir {workdir} was trained with a different config: {shown}{more}. Use --workdir NEW for a "
            f"new run, or --overwrite to delete this run's outputs and train again "
            f"({os.path.join(workdir, HISTORY_FILE)} has the history)")
    return RestartPlan("changed" if changes else "resumed", tuple(changes), statuses)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_start(workdir: str, config: ml_collections.ConfigDict, plan: RestartPlan) -> None:
    """Writes ``config.json`` and appends the history entry of ``plan`` (process 0)."""
    entry: dict[str, Any] = {"time": _now(), "event": plan.event,
                             "stages": {s: st.describe() for s, st in plan.stages.items()}}
    if plan.event in ("created", "overwritten"):
        entry["config"] = config_as_json(config)
    if plan.changes:
        entry["changes"] = {c.key: [c.old, c.new] for c in plan.changes}
        entry["reasons"] = {c.key: c.reason for c in plan.changes}
    history = os.path.join(workdir, HISTORY_FILE)
    if plan.event != "created" and not os.path.exists(history):
        entry["note"] = "no earlier history: the workdir predates config_history.jsonl"
    with open(history, "a") as f:
        f.write(json.dumps(entry) + "\n")
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def clear(workdir: str) -> list[str]:
    """``--overwrite``: deletes what a training run wrote in ``workdir`` (the stage
    directories, ``eval/``, ``config.json``) and nothing else; returns what was deleted. The
    history is kept (its next entry is ``overwritten``)."""
    removed = []
    for name in (*STAGES, "eval"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(path):
        os.remove(path)
        removed.append(path)
    return removed


__all__ = ["CONFIG_FILE", "HISTORY_FILE", "ALWAYS_SAFE", "WorkdirConflict", "StageStatus", "Change", "RestartPlan",
           "plan_restart", "record_start", "clear", "stage_status", "config_as_json", "flatten"]
