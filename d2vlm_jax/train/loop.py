"""The training driver: stages (SFT, then optionally FPO), each resumable, on a device mesh.

``run(config, workdir)`` trains the stages listed in ``config.stages`` in order, each in
``workdir/<stage>``; a finished stage leaves ``DONE.json`` and its exported params, which the
next stage starts from. Every process of a multi-host job runs the same code; process 0
writes logs, TensorBoard scalars and ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from d2vlm_jax import batch as batch_lib
from d2vlm_jax import config as cfg_lib
from d2vlm_jax import partition, sharding
from d2vlm_jax.data import pipeline
from d2vlm_jax.models import stacking
from d2vlm_jax.models.d2vlm import D2VLM, D2VLMConfig, init_variables
from d2vlm_jax.testing import random_batch
from d2vlm_jax.train import checkpoint as ckpt_lib
from d2vlm_jax.train import evaluation
from d2vlm_jax.train import optimizer as optim_lib
from d2vlm_jax.train import progress as progress_lib
from d2vlm_jax.train import workdir as workdir_lib
from d2vlm_jax.train.progress import format_seconds  # noqa: F401  (re-exported for launchers)
from d2vlm_jax.train.step import TrainState, init_state, make_train_step

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad init checkpoint, ...)."""


# ------------------------------------------------------------------------------ params


def init_params(model_cfg: D2VLMConfig, seed: int) -> dict:
    """Fresh parameters (plain arrays) from a seed."""
    example = random_batch(model_cfg, seed=0, batch=1, frames=2, qformer_len=2, prefix=8, response=6, evidence=2,
                           events=1, question_evidence=1)
    return sharding.unbox(init_variables(model_cfg, jax.random.key(seed), example))["params"]


def abstract_boxed_variables(model_cfg: D2VLMConfig):
    example = random_batch(model_cfg, seed=0, batch=1, frames=2, qformer_len=2, prefix=8, response=6, evidence=2,
                           events=1, question_evidence=1)
    return jax.eval_shape(lambda: init_variables(model_cfg, jax.random.key(0), example))


def load_init_params(path: str, fresh: Mapping, stacks: Sequence[stacking.LayerStack] = ()) -> dict:
    """Params from an Orbax params checkpoint (a previous stage's export or an imported
    release), checked against the model: every leaf must exist with the same shape. Leaves
    the checkpoint lacks (e.g. fresh LoRA adapters) keep their fresh values, and are listed.
    ``stacks`` (the model's layer stacks) convert a checkpoint of the other layer layout."""
    loaded = ckpt_lib.load_params(path, stacks=stacks)
    want = traverse_util.flatten_dict(dict(fresh), sep="/")
    got = traverse_util.flatten_dict(dict(loaded), sep="/")
    problems = []
    for k, v in got.items():
        if k not in want:
            problems.append(f"unexpected parameter {k} {tuple(np.shape(v))} (not in the model)")
        elif tuple(np.shape(v)) != tuple(want[k].shape):
            problems.append(f"shape mismatch for {k}: checkpoint {tuple(np.shape(v))} vs model {tuple(want[k].shape)}")
    if problems:
        raise TrainingError(f"init checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))
    missing = sorted(set(want) - set(got))
    if missing:
        logger.warning("init checkpoint %s lacks %d parameters; they keep their fresh init: %s%s", path,
                       len(missing), missing[:8], " ..." if len(missing) > 8 else "")
    want.update({k: np.asarray(v) for k, v in got.items()})
    return traverse_util.unflatten_dict(want, sep="/")


def state_shardings(state_abstract: TrainState, param_shardings: Mapping, mesh) -> Any:
    """Shardings of the train state: optimizer leaves mirroring a parameter take its sharding
    (matched by the trailing dict-key path); everything else is replicated."""
    flat = traverse_util.flatten_dict(dict(param_shardings), sep="/")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def one(path, leaf):
        keys = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
        for i in range(len(keys)):
            cand = "/".join(keys[i:])
            if cand in flat and getattr(leaf, "ndim", 0) > 0:
                return flat[cand]
        return replicated

    return jax.tree_util.tree_map_with_path(one, state_abstract)


# ------------------------------------------------------------------------------ logging


class MetricsLog:
    """TensorBoard + metrics.jsonl (process 0 only)."""

    def __init__(self, stage_dir: str, stage: str, total_steps: int, enabled: bool):
        self.stage, self.total, self.enabled = stage, total_steps, enabled
        self.jsonl = None
        self.tb = None
        if enabled:
            os.makedirs(stage_dir, exist_ok=True)
            self.jsonl = open(os.path.join(stage_dir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001
                logger.warning("tensorboardX unavailable (%s); TensorBoard scalars are not written", e)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "split": prefix, "step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
            self.tb.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


# ------------------------------------------------------------------------------ a stage


def device_batch(host_batch: Mapping[str, np.ndarray], mesh, rules, keys) -> dict:
    return sharding.host_batch_to_global({k: host_batch[k] for k in keys}, mesh, rules)


def stage_data_config(config: ml_collections.ConfigDict, stage_cfg: ml_collections.ConfigDict):
    data = ml_collections.ConfigDict(config.data.to_dict())
    for k, v in stage_cfg.get("data", ml_collections.ConfigDict()).items():
        data[k] = v
    return data


def resolve_steps(stage_cfg: ml_collections.ConfigDict, data_cfg, stage: str) -> int:
    """``<stage>.steps``, or (when 0) ``epochs`` passes over the training annotations."""
    if stage_cfg.steps > 0:
        return int(stage_cfg.steps)
    epochs = stage_cfg.get("epochs", 0)
    if not epochs or epochs <= 0:
        raise cfg_lib.ConfigError(f"config.{stage}: set steps > 0 or epochs > 0")
    samples, _, _ = pipeline.read_annotations(data_cfg.train_annotations)
    return max(1, math.ceil(len(samples) * epochs / stage_cfg.batch_size))


@dataclasses.dataclass(frozen=True)
class TrainStepSetup:
    """Everything the train step of a stage is built from on a mesh: the single definition
    shared by the training loop and the deviceless compile check (``compile_check``).

    Attributes:
      model: the D2VLM module.
      patterns: trainable-parameter regex table of the config.
      boxed: abstract (``jax.eval_shape``) variables with their logical-axis boxes.
      param_shardings / trainable_shardings / frozen_shardings: ``NamedSharding`` trees.
      tx, schedules: the stage's optimizer and its learning-rate schedules.
      state_abstract, state_shardings: the :class:`TrainState` shapes and shardings.
      step_fn: the pure train step ``(state, frozen, batch, reference) -> (state, metrics)``.
      batch_keys: the batch entries the step reads (SFT or FPO contract).
    """
    model: D2VLM
    patterns: Any
    boxed: Any
    param_shardings: Any
    trainable_shardings: Any
    frozen_shardings: Any
    tx: Any
    schedules: Mapping[str, Any]
    state_abstract: TrainState
    state_shardings: Any
    step_fn: Any
    batch_keys: tuple[str, ...]

    def jit(self, with_reference: bool):
        """The step jitted with the state sharded and donated, frozen params sharded, the batch
        taken as placed, and (FPO with a frozen reference) the reference params sharded."""
        return jax.jit(self.step_fn, in_shardings=(self.state_shardings, self.frozen_shardings, None,
                                                   self.param_shardings if with_reference else None),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    def placed_state(self) -> TrainState:
        """The train state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings."""
        return ckpt_lib.abstract_like(self.state_abstract, self.state_shardings)

    def placed_frozen(self) -> Any:
        """The frozen params as ``jax.ShapeDtypeStruct`` leaves carrying their shardings."""
        frozen = partition.split(sharding.unbox(self.boxed)["params"], self.patterns)[1]
        return ckpt_lib.abstract_like(frozen, self.frozen_shardings)

    def abstract_arguments(self, batch: Mapping[str, jax.ShapeDtypeStruct], with_reference: bool) -> tuple:
        """``jax.ShapeDtypeStruct`` arguments of :meth:`jit` carrying their shardings (the batch
        over the ``batch`` mesh axes), for lowering without allocating anything."""
        mesh, rules = jax.tree.leaves(self.param_shardings)[0].mesh, self.model.config.llm.sharding_rules
        placed_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                sharding=sharding.batch_sharding(mesh, len(v.shape), rules))
                        for k, v in batch.items()}
        reference = (ckpt_lib.abstract_like(sharding.unbox(self.boxed)["params"], self.param_shardings)
                     if with_reference else None)
        return self.placed_state(), self.placed_frozen(), placed_batch, reference


def build_train_step(config: ml_collections.ConfigDict, stage: str, model_cfg: D2VLMConfig, mesh,
                     total_steps: int) -> TrainStepSetup:
    """The train step of ``stage`` on ``mesh``: model, shardings from ``jax.eval_shape`` (nothing
    allocated), optimizer for ``total_steps``, and the pure step function."""
    stage_cfg = config[stage]
    rules = model_cfg.llm.sharding_rules
    patterns = cfg_lib.trainable_patterns(config)
    model = D2VLM(model_cfg)
    boxed = abstract_boxed_variables(model_cfg)
    param_sh = sharding.shardings_for(boxed, mesh, rules)["params"]
    t_sh, f_sh = partition.split(param_sh, patterns)
    tx, schedules = optim_lib.make_optimizer(stage_cfg.optim, total_steps)
    trainable_abstract = partition.split(sharding.unbox(boxed)["params"], patterns)[0]
    state_abstract = jax.eval_shape(lambda t: init_state(t, tx, jax.random.key(0)), trainable_abstract)
    step_fn = make_train_step(model, cfg_lib.loss_config(config), tx, stage=stage,
                              micro_batches=stage_cfg.micro_batches, dropout=model_cfg.llm.lora_dropout > 0,
                              schedules=schedules)
    return TrainStepSetup(model=model, patterns=patterns, boxed=boxed, param_shardings=param_sh,
                          trainable_shardings=t_sh, frozen_shardings=f_sh, tx=tx, schedules=schedules,
                          state_abstract=state_abstract,
                          state_shardings=state_shardings(state_abstract, t_sh, mesh), step_fn=step_fn,
                          batch_keys=batch_lib.FPO_KEYS if stage == "fpo" else batch_lib.SFT_KEYS)


def train_stage(config: ml_collections.ConfigDict, stage: str, workdir: str, model_cfg: D2VLMConfig,
                tokenizers, init_from: str | None, progress: progress_lib.RunProgress | None = None) -> dict:
    """Trains one stage to completion (resuming if it has checkpoints); returns final metrics.
    ``progress`` reports the steps (default: a :class:`progress_lib.RunProgress` of this stage)."""
    stage_cfg = config[stage]
    stage_dir = os.path.join(workdir, stage)
    data_cfg = stage_data_config(config, stage_cfg)
    total_steps = resolve_steps(stage_cfg, data_cfg, stage)
    is_main = jax.process_index() == 0
    pcount = jax.process_count()
    mesh_sizes = cfg_lib.check_mesh_and_batch(config, jax.device_count(), pcount, stage_cfg.batch_size,
                                              stage_cfg.micro_batches, f"config.{stage}")
    mesh = sharding.make_mesh(mesh_sizes)
    rules = model_cfg.llm.sharding_rules
    loss_cfg = cfg_lib.loss_config(config)
    tokenizer, qformer_tokenizer = tokenizers
    setup = build_train_step(config, stage, model_cfg, mesh, total_steps)
    model, patterns, boxed = setup.model, setup.patterns, setup.boxed
    param_sh, t_sh, f_sh = setup.param_shardings, setup.trainable_shardings, setup.frozen_shardings
    tx, state_sh = setup.tx, setup.state_shardings
    counts = partition.summary(sharding.unbox(boxed)["params"], patterns)
    if is_main:
        logger.info("[%s] parameters: %s trainable, %s frozen; mesh %s", stage, f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}", mesh_sizes)

    mngr = ckpt_lib.manager(stage_dir, max_to_keep=config.checkpoint.max_to_keep,
                            save_every=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
    data_iter = pipeline.make_train_iterator(
        data_cfg, stage=stage, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        batch_size_per_host=stage_cfg.batch_size // pcount, process_index=jax.process_index(),
        process_count=pcount, seed=config.seed)

    frozen_dir = os.path.join(stage_dir, "frozen")
    with jax.set_mesh(mesh):
        if mngr.latest_step() is not None:
            frozen = ckpt_lib.load_params(frozen_dir, setup.placed_frozen(), stacks=model_cfg.layer_stacks)
            state, start = ckpt_lib.restore(mngr, setup.placed_state(), data_iter, stacks=model_cfg.layer_stacks)
            if is_main:
                print(f"[{stage}] resumed from step {start} of {total_steps} ({stage_dir}/checkpoints)", flush=True)
        else:
            # initialized directly into its shardings: never materialized on one device
            fresh = jax.jit(lambda: init_params(model_cfg, config.seed), out_shardings=param_sh)()
            params = load_init_params(init_from, fresh, model_cfg.layer_stacks) if init_from else fresh
            trainable, frozen = partition.split(params, patterns)
            frozen = jax.device_put(frozen, f_sh)
            ckpt_lib.save_params(frozen_dir, frozen)
            state = jax.jit(lambda t: init_state(t, tx, jax.random.key(config.seed + 1)),
                            out_shardings=state_sh)(jax.device_put(trainable, t_sh))
            start = 0
        reference = None
        if loss_cfg.fpo_reference == "frozen_params" and stage == "fpo":
            if not init_from:
                raise TrainingError("loss.fpo_reference='frozen_params' needs an init checkpoint (the SFT params)")
            reference = jax.device_put(load_init_params(init_from, init_params(model_cfg, config.seed)), param_sh)

        keys = setup.batch_keys
        jit_step = sharding.compile_in_lockstep(setup.jit(with_reference=reference is not None), f"{stage} step")

        log = MetricsLog(stage_dir, stage, total_steps, is_main)
        if progress is None:
            progress = progress_lib.RunProgress({stage: (total_steps - start, 1.0)}, enabled=is_main)
        progress.start_stage(stage, start, total_steps)
        examples_log = None
        if config.get("log_example_ids"):  # which samples each step consumed (resume checks)
            os.makedirs(stage_dir, exist_ok=True)  # every process writes its own file
            examples_log = open(os.path.join(stage_dir, f"examples.process_{jax.process_index()}.jsonl"), "a")
        t_last, step_last = time.time(), start
        tokens_acc = frames_acc = 0.0
        metrics_acc: dict[str, float] = {}
        n_acc = 0
        last_metrics: dict[str, float] = {}
        try:
            for step in range(start, total_steps):
                host = next(data_iter)
                tokens_acc += float(host["prefix_valid"].sum() + host["response_valid"].sum()) * pcount
                frames_acc += float(host["frame_valid"].sum()) * pcount
                state, metrics = jit_step(state, frozen, device_batch(host, mesh, rules, keys), reference)
                metrics = jax.device_get(metrics)
                if examples_log is not None:  # per process: its samples, and the (global) loss it saw
                    examples_log.write(json.dumps({"step": step + 1, "example_id": host["example_id"].tolist(),
                                                   "loss": float(metrics["loss/total"])}) + "\n")
                    examples_log.flush()
                if not metrics["finite"]:
                    mngr.wait_until_finished()
                    raise TrainingError(
                        f"[{stage}] non-finite loss or gradient at step {step + 1} (loss {metrics['loss/total']}, "
                        f"grad norm {metrics['grad_norm']}); the update was skipped and the latest checkpoint "
                        f"(step {mngr.latest_step()}) is the last good state. Lower the learning rate or check the data.")
                for k, v in metrics.items():
                    metrics_acc[k] = metrics_acc.get(k, 0.0) + float(v)
                n_acc += 1
                done = step + 1
                ckpt_lib.save(mngr, done, state, data_iter, force=done == total_steps)
                if done % config.log_every == 0 or done == total_steps:
                    now = time.time()
                    dt = max(now - t_last, 1e-9)
                    rates = {"steps": (done - step_last) / dt, "tokens": tokens_acc / dt, "frames": frames_acc / dt}
                    last_metrics = {k: v / n_acc for k, v in metrics_acc.items()}
                    log.write(done, {**last_metrics, **{f"rate/{k}": v for k, v in rates.items()}})
                    progress.update(done, last_metrics, rates)
                    t_last, step_last, tokens_acc, frames_acc, metrics_acc, n_acc = now, done, 0.0, 0.0, {}, 0
                if config.eval_every and done % config.eval_every == 0 and done < total_steps:
                    eval_metrics = evaluation.evaluate(config, model, partition.merge(state.params, frozen), stage,
                                                       tokenizers, mesh, max_batches=config.eval_batches_during_train)
                    log.write(done, eval_metrics, prefix="eval")
                    progress.note(f"[{stage}] eval @ {done}: " + evaluation.format_metrics(eval_metrics))
            mngr.wait_until_finished()
            params = partition.merge(state.params, frozen)
            export_dir = os.path.join(stage_dir, "export", "params")
            ckpt_lib.save_params(export_dir, params)
            if is_main:  # params/ + d2vlm_config.json: the layout of an imported checkpoint
                from d2vlm_jax.weights.d2vlm_checkpoint import save_model_config
                save_model_config(os.path.dirname(export_dir), model_cfg)
            final = {"stage": stage, "steps": total_steps, "export": export_dir,
                     "config": workdir_lib.config_as_json(config),
                     "train": {k: float(v) for k, v in last_metrics.items()},
                     "pipeline": data_iter.stats.summary() if hasattr(data_iter, "stats") else ""}
            if is_main:
                with open(os.path.join(stage_dir, "DONE.json"), "w") as f:
                    json.dump(final, f, indent=2)
            return final
        finally:
            progress.end_stage()
            log.close()
            if examples_log is not None:
                examples_log.close()
            mngr.close()
            if hasattr(data_iter, "close"):
                data_iter.close()


def export_dir_of(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "export", "params")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def stage_done(workdir: str, stage: str) -> bool:
    return os.path.exists(os.path.join(workdir, stage, "DONE.json"))


def run(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict:
    """Runs every stage of ``config.stages`` (skipping finished ones) and the final evaluation.

    A workdir that has trained before must be restarted with the same config, or with a
    change :mod:`d2vlm_jax.train.workdir` accepts (raises ``WorkdirConflict`` otherwise);
    ``overwrite`` first deletes what an earlier run wrote there."""
    for stage in config.stages:
        if stage not in ("sft", "fpo"):
            raise cfg_lib.ConfigError(f"config.stages: unknown stage {stage!r} (use 'sft' and/or 'fpo')")
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if overwrite:
        if is_main:
            removed = workdir_lib.clear(workdir)
            if removed:
                print(f"[workdir] --overwrite: deleted {len(removed)} item(s) of the earlier run in {workdir}",
                      flush=True)
        _barrier("workdir cleared")
    plan = workdir_lib.plan_restart(workdir, config)
    if overwrite and plan.event == "created":
        plan = dataclasses.replace(plan, event="overwritten")
    # no barrier here: process 0 replaces config.json atomically, and a process that reads the
    # new one sees the same config (identical) where the old one gave safe changes: one decision
    if is_main:
        workdir_lib.record_start(workdir, config, plan)
        if plan.changes:
            print(f"[workdir] applying config change(s) to {workdir}: "
                  + "; ".join(f"{c.line()} ({c.reason})" for c in plan.changes)
                  + f" (recorded in {workdir_lib.HISTORY_FILE})", flush=True)
    if config.get("synthetic") and config.synthetic.generate:
        from d2vlm_jax.data import synthetic_setup
        synthetic_setup.ensure_synthetic_data(config)
    tokenizers = pipeline.load_tokenizers(config.data)
    model_cfg = cfg_lib.model_config(config, vocab_size=tokenizers[0].vocab_size,
                                     qformer_vocab_size=tokenizers[1].vocab_size)
    results = {}
    todo = {}
    for stage in config.stages:     # the ETA of the whole run: every step still to take
        if not plan.stages[stage].finished:
            stage_cfg = config[stage]
            total = resolve_steps(stage_cfg, stage_data_config(config, stage_cfg), stage)
            todo[stage] = (max(total - plan.stages[stage].step, 0), progress_lib.step_cost(stage, stage_cfg.batch_size))
    progress = progress_lib.RunProgress(todo, enabled=is_main)
    previous = config.get("init_checkpoint") or None
    for stage in config.stages:
        init_from = config[stage].get("init_checkpoint") or previous
        if stage_done(workdir, stage):
            with open(os.path.join(workdir, stage, "DONE.json")) as f:
                results[stage] = json.load(f)
            if is_main:
                print(f"[{stage}] already done ({workdir}/{stage}/DONE.json): skipped", flush=True)
        else:
            results[stage] = train_stage(config, stage, workdir, model_cfg, tokenizers, init_from, progress)
        previous = export_dir_of(workdir, stage)
    if config.get("final_eval", True):
        model = D2VLM(model_cfg)
        mesh = sharding.make_mesh(dict(config.mesh))
        params = ckpt_lib.load_params(previous, stacks=model_cfg.layer_stacks)
        with jax.set_mesh(mesh):
            params = jax.device_put(params, sharding.shardings_for(abstract_boxed_variables(model_cfg), mesh,
                                                                   model_cfg.llm.sharding_rules)["params"])
            table = evaluation.final_report(config, model, params, tokenizers, mesh, workdir)
        results["eval"] = table
    return results

