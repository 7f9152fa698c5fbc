"""Evaluation during and after training on the held-out split.

Two kinds of numbers:

* **teacher-forced** (cheap): the SFT loss terms and the grounding accuracy (argmax frame of
  each evidence query inside its GT interval) with the ground-truth response fed in;
* **generated** (the real task): grounding-then-answering decoding (greedy unless a
  decoding preset is given)
  (``d2vlm_jax.inference.decode``); the first grounding-stage interval of every temporal
  grounding (``tvg``) question is compared with the ground truth: R@{0.3, 0.5, 0.7} and
  mIoU. Intervals are compared as frame spans at the sampling rate (``[first, last + 1)``
  frames), the convention of ``synthetic.blind_baseline``, which the report prints next to
  the model as the video-blind reference.

:func:`evaluate_annotations` is the one pass both the training run (:func:`evaluate`,
:func:`final_report`) and ``launch/evaluate.py`` use; generated metrics are summed over
processes, predictions stay per process (``launch/evaluate.py`` merges them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from d2vlm_jax import batch as batch_lib
from d2vlm_jax import config as cfg_lib
from d2vlm_jax import losses, objective, sharding
from d2vlm_jax.data import pipeline, schema
from d2vlm_jax.inference import decode as decode_lib
from d2vlm_jax.inference import presets
from d2vlm_jax.models.d2vlm import D2VLM

logger = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.5, 0.7)

_WEIGHTED = ("loss/lm", "loss/gnd", "loss/cons", "grounding/accuracy")   # combined with losses.metric_normalizer


def span_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """IoU of inclusive frame intervals as spans ``[first, last + 1)``."""
    inter = max(0, min(a[1], b[1]) + 1 - max(a[0], b[0]))
    union = (a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter
    return inter / union if union > 0 else 0.0


def evaluate(config: ml_collections.ConfigDict, model: D2VLM, params: Any, stage: str, tokenizers, mesh,
             max_batches: int | None = None, predictions: list | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Teacher-forced metrics and generated-grounding metrics on ``data.eval_annotations``
    (the training run's view: :func:`evaluate_annotations` with the experiment config's
    data section, ``eval_batch_size`` and ``eval_max_new_tokens``)."""
    return evaluate_annotations(model, params, data_config=config.data, tokenizers=tokenizers, mesh=mesh,
                                global_batch_size=config.eval_batch_size,
                                max_new_tokens=config.eval_max_new_tokens, loss_config=cfg_lib.loss_config(config),
                                max_batches=max_batches, predictions=predictions, progress=progress)


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
    """float64[K] per-process sums -> the sums over all processes (identity on one host)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    high = values.astype(np.float32)                         # float64 sent as two float32 parts
    low = (values - high.astype(np.float64)).astype(np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(np.stack([high, low]))).astype(np.float64)
    return gathered.reshape(jax.process_count(), 2, -1).sum(axis=(0, 1))


def _all_process_rows(local: np.ndarray) -> np.ndarray:
    """float32[local rows] of every process, concatenated in process order (the global
    batch's row order of ``sharding.host_batch_to_global``)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1)


def process_local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order of its host batch
    (``jax.make_array_from_process_local_data`` put them on the addressable shards in order)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    by_start: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:   # shards replicated over other mesh axes: keep one
        by_start.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([by_start[k] for k in sorted(by_start)], axis=0)


def evaluate_annotations(model: D2VLM, params: Any, *, data_config: ml_collections.ConfigDict, tokenizers, mesh,
                         global_batch_size: int, max_new_tokens: int,
                         loss_config: losses.LossConfig | None = None, max_batches: int | None = None,
                         predictions: list | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         stats: pipeline.PipelineStats | None = None,
                         decode_config: decode_lib.DecodeConfig | None = None,
                         penalty_for_task: Callable[[str], float] | None = None,
                         seed: int = 0) -> dict[str, float]:
    """One pass of grounding-then-answering generation over ``data_config.eval_annotations``.

    The one evaluation code path: the training run (:func:`evaluate`, :func:`final_report`) and
    ``launch/evaluate.py`` both call it.

    Args:
      model, params: the model and its (mesh-placed) params.
      data_config: ``config.data``; ``eval_annotations`` is the file evaluated.
      tokenizers: ``(TextTokenizer, QFormerTokenizer)``.
      mesh: batches are placed with their batch axis over the mesh's data axes.
      global_batch_size: rows per step over all processes (each process takes
        ``global_batch_size // process_count`` rows of its shard of the file).
      max_new_tokens: decode steps.
      loss_config: also compute the teacher-forced metrics (``tf/*``; the annotations must
        carry real answers); None skips them.
      max_batches: stop after this many batches (in-training evaluation).
      predictions: a list to append one record per evaluated sample of this process to
        (:func:`prediction_record`).
      progress: ``progress(batches_done, batches_total)`` after every batch.
      stats: filled with the pipeline's skip counts (a fresh one when None).
      decode_config: the decoding settings (default: greedy, ``max_new_tokens``, stop at
        ``<|end|>``; ``inference.presets.decode_config`` builds the named presets).
      penalty_for_task: repetition penalty of a row from its sample's task (default: the
        config's value for every row).
      seed: sampling seed (batch ``i`` samples with ``fold_in(key(seed), i)``).
    Returns:
      ``tvg/R@{0.3,0.5,0.7}``, ``tvg/mIoU``, ``tvg/num`` (first grounding interval of every
      ``tvg`` sample vs its first GT event, as frame spans), ``answer/exact_match`` and, with
      ``loss_config``, ``tf/loss/*`` and ``tf/grounding/accuracy``; all over every process.
      A sample the pipeline skips (its video cannot be used, ...) is scored as a miss (IoU 0,
      no answer match) and counted: ``samples/{seen,scored,evaluated,skipped}`` and
      ``samples/skipped/<reason>`` (:func:`sample_counts`).
    """
    tokenizer, qformer_tokenizer = tokenizers
    rules = model.config.llm.sharding_rules
    pcount = jax.process_count()
    batch_size = max(global_batch_size // pcount, 1)
    tf_fn = None
    if loss_config is not None:
        tf_fn = sharding.compile_in_lockstep(jax.jit(
            lambda p, b: (objective.loss_and_metrics(model, p, b, loss_config, stage="sft")[1],
                          losses.normalizers(b))), "teacher-forced eval")
    dcfg = decode_config or decode_lib.DecodeConfig(max_new_tokens=max_new_tokens, evi_token_id=tokenizer.evi_id,
                                                    end_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id)
    gen_fn = decode_lib.make_generate_fn(model, dcfg)
    samples, indices, annotation_report = pipeline.read_annotations(data_config.eval_annotations)
    by_index = dict(zip(indices, samples))
    full_total = pipeline.num_eval_batches(len(samples), batch_size, pcount)
    total = full_total if max_batches is None else min(full_total, max_batches)
    stats = stats if stats is not None else pipeline.PipelineStats()
    batches = pipeline.make_eval_batches(data_config, stage="sft", tokenizer=tokenizer,
                                         qformer_tokenizer=qformer_tokenizer, batch_size_per_host=batch_size,
                                         process_index=jax.process_index(), process_count=pcount, stats=stats)
    sums: dict[str, float] = {}
    dens: dict[str, float] = {}
    ious: list[float] = []
    answer_hits = answer_total = 0
    for batch_index, host in enumerate(batches):
        if batch_index >= total:
            break
        keys = batch_lib.SFT_KEYS if tf_fn is not None else decode_lib.PREFIX_KEYS
        dev = sharding.host_batch_to_global({k: host[k] for k in keys}, mesh, rules)
        if tf_fn is not None:
            metrics, norm = jax.device_get(tf_fn(params, dev))
            for k in _WEIGHTED:
                w = losses.metric_normalizer(loss_config, k)
                sums[k] = sums.get(k, 0.0) + float(metrics[k]) * float(norm[w])
                dens[k] = dens.get(k, 0.0) + float(norm[w])
        rng = None if dcfg.greedy else jax.random.fold_in(jax.random.key(seed), batch_index)
        penalties = None
        if penalty_for_task is not None:   # one value per global row (this process's rows are its slice)
            local = [penalty_for_task(by_index[int(e)].task) if int(e) >= 0 else 1.0 for e in host["example_id"]]
            penalties = _all_process_rows(np.asarray(local, np.float32))
        rows = decode_lib.unbatch(jax.tree.map(process_local_rows, gen_fn({"params": params}, dev, rng,
                                                                          repetition_penalty=penalties)),
                                  tokenizer.evi_id)
        for r, row in enumerate(rows):
            example_id = int(host["example_id"][r])
            if example_id < 0:
                continue
            record = prediction_record(row, host, r, by_index[example_id], tokenizer)
            if record["task"] == "tvg":
                ious.append(record["iou"])
            answer_hits += int(record["answer_match"])
            answer_total += 1
            if predictions is not None:
                predictions.append(record)
        if progress is not None:
            progress(batch_index + 1, total)
    # samples the pipeline skipped (video unusable, ...) are scored as misses: IoU 0, wrong answer
    evaluated = answer_total
    missed = [by_index[i] for i in stats.skipped_indices if i in by_index]
    ious += [0.0] * sum(sample.task == "tvg" for sample in missed)
    answer_total += len(missed)
    # generated metrics: sums over processes (each process saw its own shard)
    hits = [sum(i >= t for i in ious) for t in THRESHOLDS]
    reasons = [stats.skipped.get(r, 0) for r in pipeline.SKIP_REASONS]
    totals = _sum_over_processes(np.asarray(hits + [sum(ious), len(ious), answer_hits, answer_total, evaluated]
                                            + reasons, np.float64))
    k = len(THRESHOLDS)
    num_tvg, scored, num_evaluated = totals[k + 1], totals[k + 3], totals[k + 4]
    out = {f"tf/{k}": sums[k] / max(dens[k], 1.0) for k in sums}
    for t, h in zip(THRESHOLDS, totals[:k]):
        out[f"tvg/R@{t}"] = float(h / num_tvg) if num_tvg else 0.0
    out["tvg/mIoU"] = float(totals[k] / num_tvg) if num_tvg else 0.0
    out["tvg/num"] = float(num_tvg)
    out["answer/exact_match"] = float(totals[k + 2] / max(scored, 1.0))
    invalid = annotation_report.num_skipped if total == full_total else 0   # whole file read on every process
    out.update(sample_counts(num_evaluated, dict(zip(pipeline.SKIP_REASONS, totals[k + 5:])), invalid))
    return out


def sample_counts(evaluated: float, skipped: Mapping[str, float], invalid_annotations: int) -> dict[str, float]:
    """The ``samples/*`` entries of the metrics: ``seen`` (records reached, invalid ones
    included), ``scored`` (in the denominators: ``evaluated`` + the skipped samples, scored as
    misses), ``evaluated`` (generated for) and ``skipped/<reason>`` (non-zero reasons;
    ``invalid_annotation`` records are left out of the scores: no task or ground truth)."""
    missed = float(sum(skipped.values()))
    out = {"samples/seen": float(evaluated + missed + invalid_annotations), "samples/scored": float(evaluated + missed),
           "samples/evaluated": float(evaluated), "samples/skipped": float(missed + invalid_annotations)}
    out.update({f"samples/skipped/{r}": float(n) for r, n in skipped.items() if n})
    if invalid_annotations:
        out["samples/skipped/invalid_annotation"] = float(invalid_annotations)
    return out


def format_sample_counts(m: Mapping[str, float]) -> str:
    """``9 samples seen, 9 scored (0 skipped)`` with the skip reasons."""
    reasons = ", ".join(f"{k.split('/')[-1]} {int(v)}" for k, v in m.items() if k.startswith("samples/skipped/"))
    return (f"{int(m.get('samples/seen', 0))} samples seen, {int(m.get('samples/scored', 0))} scored "
            f"({int(m.get('samples/skipped', 0))} skipped{': ' + reasons if reasons else ''}; "
            f"unusable videos are scored as misses, invalid records left out)")


def prediction_record(row: decode_lib.RowResult, host: Mapping[str, np.ndarray], r: int, sample: schema.Sample,
                      tokenizer) -> dict[str, Any]:
    """One evaluated sample: the rendered answer (SPEC §5.4), the grounding-stage intervals
    (frames and seconds) next to the ground truth, the IoU of the first ones (frame spans)
    and whether the answer tokens equal the ground truth's (``<evi>`` excluded)."""
    ids = row.token_ids
    evi_at = [k for k, t in enumerate(ids) if t == tokenizer.evi_id]
    end_evi = [k for k, t in enumerate(ids) if t == tokenizer.evi_end_id]
    grounding = [iv for k, iv in zip(evi_at, row.evidence_intervals) if end_evi and k < end_evi[0]]
    gt = [tuple(int(x) for x in host["event_intervals"][r, k]) for k in range(host["event_valid"].shape[1])
          if host["event_valid"][r, k]]
    iou = span_iou(grounding[0], gt[0]) if grounding and gt else 0.0
    gt_ids = [int(t) for t, v in zip(host["response_ids"][r], host["response_valid"][r]) if v]
    gt_end = gt_ids.index(tokenizer.evi_end_id) if tokenizer.evi_end_id in gt_ids else -1
    gt_answer = [t for t in gt_ids[gt_end + 1:] if t != tokenizer.evi_id]
    answer = [t for t in ids[(end_evi[0] + 1 if end_evi else 0):] if t != tokenizer.evi_id]
    text, seconds = decode_lib.render_answer(
        ids, row.evidence_intervals, lambda t: tokenizer.decode(t), host["frame_times"][r],
        evi_token_id=tokenizer.evi_id, evi_end_token_id=tokenizer.evi_end_id,
        stop_token_ids=(tokenizer.end_id, tokenizer.pad_id))
    try:
        authors = presets.authors_text(ids, row.evidence_intervals, lambda t: tokenizer.decode(t))
    except ValueError as e:      # a literal "<evi>" spelled by ordinary tokens: counted by the caller
        authors = None
        logger.warning("sample %d: %s", int(host["example_id"][r]), e)
    num_frames = int(np.asarray(host["frame_valid"][r]).sum())
    return {"index": int(host["example_id"][r]), "video": sample.video, "task": sample.task,
            "question": sample.question, "gt_answer": sample.answer,
            "gt_events": [list(e) for e in sample.events], "prediction": text,
            "authors_text": authors,
            "prompt_tokens": int(np.asarray(host["prefix_valid"][r]).sum()) - num_frames + 1,
            "finished": row.finished, "num_frames": num_frames,
            "evidence_frames": [list(iv) for iv in row.evidence_intervals],
            "grounding_seconds": [list(s) for s in seconds],
            "grounding_frames": [list(g) for g in grounding], "gt_frames": [list(g) for g in gt],
            "iou": iou, "answer_match": answer == gt_answer}


def format_metrics(m: Mapping[str, float]) -> str:
    keys = ["tvg/R@0.3", "tvg/R@0.5", "tvg/R@0.7", "tvg/mIoU", "answer/exact_match", "tf/grounding/accuracy",
            "tf/loss/lm"]
    return " ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def final_report(config: ml_collections.ConfigDict, model: D2VLM, params: Any, tokenizers, mesh,
                 workdir: str) -> dict[str, Any]:
    """Full held-out evaluation: predictions JSON, metrics JSON and a printed table with the
    video-blind baseline next to the model (in ``workdir/eval``)."""
    from d2vlm_jax.train.progress import PassProgress
    predictions: list = []
    progress = PassProgress("[eval]", enabled=jax.process_index() == 0)
    try:
        metrics = evaluate(config, model, params, "final", tokenizers, mesh, predictions=predictions,
                           progress=progress)
    finally:
        progress.close()
    blind = video_blind_reference(config.data.train_annotations, config.data.eval_annotations)
    return write_report(metrics, blind, predictions, os.path.join(workdir, "eval"))


def video_blind_reference(train_annotations: str, eval_annotations: str) -> dict[str, Any]:
    """``synthetic.blind_baseline`` of the two annotation files (printed next to the model)."""
    from d2vlm_jax.data.synthetic import blind_baseline
    train = schema.load_annotations(train_annotations, on_error="skip")
    val = schema.load_annotations(eval_annotations, on_error="skip")
    return blind_baseline(train, val)


def write_report(metrics: Mapping[str, float], blind: Mapping[str, Any], predictions: list,
                 out_dir: str, decoding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Process 0 writes ``out_dir/predictions.json`` and ``out_dir/metrics.json`` (``{"model":
    metrics, "video_blind": blind}``, plus ``"decoding"`` when given) and prints
    :func:`render_table`; returns that dict."""
    report = {"model": dict(metrics), "video_blind": dict(blind)}
    if decoding is not None:
        report["decoding"] = dict(decoding)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "predictions.json"), "w") as f:
            json.dump(predictions, f, indent=1)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(render_table(metrics, blind), flush=True)
        print(format_sample_counts(metrics), flush=True)
        print(f"predictions: {out_dir}/predictions.json  metrics: {out_dir}/metrics.json", flush=True)
    return report


def render_table(metrics: Mapping[str, float], blind: Mapping[str, Any]) -> str:
    rows = [("temporal grounding (tvg), generated", "", ""),
            ("  R@0.3", f"{metrics.get('tvg/R@0.3', 0):.3f}", ""),
            ("  R@0.5", f"{metrics.get('tvg/R@0.5', 0):.3f}", f"{blind.get('most_common_val_r_at_0_5') or 0:.3f}"),
            ("  R@0.7", f"{metrics.get('tvg/R@0.7', 0):.3f}", ""),
            ("  mIoU", f"{metrics.get('tvg/mIoU', 0):.3f}", f"{blind.get('most_common_val_miou') or 0:.3f}"),
            ("answer exact match (all tasks)", f"{metrics.get('answer/exact_match', 0):.3f}", ""),
            ("teacher-forced grounding accuracy", f"{metrics.get('tf/grounding/accuracy', 0):.3f}", "")]
    width = max(len(r[0]) for r in rows)
    lines = ["", "held-out evaluation " + "-" * 40,
             f"{'metric':<{width}}  {'model':>8}  {'video-blind':>11}"]
    lines += [f"{a:<{width}}  {b:>8}  {c:>11}" for a, b, c in rows]
    lines.append(f"(video-blind = always the most common training interval "
                 f"{blind.get('most_common_train_interval')}; {int(metrics.get('tvg/num', 0))} tvg questions)")
    return "\n".join(lines)

