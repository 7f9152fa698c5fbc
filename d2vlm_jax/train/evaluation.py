"""Evaluation during and after training on the held-out split.

Two kinds of numbers:

* **teacher-forced** (cheap): the SFT loss terms and the grounding accuracy (argmax frame of
  each evidence query inside its GT interval) with the ground-truth response fed in;
* **generated** (the real task): greedy grounding-then-answering decoding
  (``d2vlm_jax.inference.decode``); the first grounding-stage interval of every temporal
  grounding (``tvg``) question is compared with the ground truth: R@{0.3, 0.5, 0.7} and
  mIoU. Intervals are compared as frame spans at the sampling rate (``[first, last + 1)``
  frames), the convention of ``synthetic.blind_baseline``, which the report prints next to
  the model as the video-blind reference.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from d2vlm_jax import batch as batch_lib
from d2vlm_jax import config as cfg_lib
from d2vlm_jax import losses, objective, sharding
from d2vlm_jax.data import pipeline, schema
from d2vlm_jax.inference import decode as decode_lib
from d2vlm_jax.models.d2vlm import D2VLM

THRESHOLDS = (0.3, 0.5, 0.7)

_WEIGHT = {"loss/lm": "tokens", "loss/gnd": "samples_with_evidence", "loss/cons": "samples_with_evidence",
           "grounding/accuracy": "evidence"}


def span_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """IoU of inclusive frame intervals as spans ``[first, last + 1)``."""
    inter = max(0, min(a[1], b[1]) + 1 - max(a[0], b[0]))
    union = (a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter
    return inter / union if union > 0 else 0.0


def _eval_batches(config, tokenizers, max_batches):
    tokenizer, qformer_tokenizer = tokenizers
    pcount = jax.process_count()
    bs = max(config.eval_batch_size // pcount, 1)
    batches = pipeline.make_eval_batches(config.data, stage="sft", tokenizer=tokenizer,
                                         qformer_tokenizer=qformer_tokenizer, batch_size_per_host=bs,
                                         process_index=jax.process_index(), process_count=pcount)
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        yield b


def evaluate(config: ml_collections.ConfigDict, model: D2VLM, params: Any, stage: str, tokenizers, mesh,
             max_batches: int | None = None, predictions: list | None = None) -> dict[str, float]:
    """Teacher-forced metrics and generated-grounding metrics on ``data.eval_annotations``."""
    loss_cfg = cfg_lib.loss_config(config)
    rules = model.config.llm.sharding_rules
    tokenizer = tokenizers[0]
    tf_fn = jax.jit(lambda p, b: (objective.loss_and_metrics(model, p, b, loss_cfg, stage="sft")[1],
                                  losses.normalizers(b)))
    dcfg = decode_lib.DecodeConfig(max_new_tokens=config.eval_max_new_tokens, evi_token_id=tokenizer.evi_id,
                                   end_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id)
    gen_fn = decode_lib.make_generate_fn(model, dcfg)
    samples, indices, _ = pipeline.read_annotations(config.data.eval_annotations)
    by_index = dict(zip(indices, samples))
    sums: dict[str, float] = {}
    dens: dict[str, float] = {}
    ious: list[float] = []
    answer_hits = answer_total = 0
    for host in _eval_batches(config, tokenizers, max_batches):
        dev = sharding.host_batch_to_global({k: host[k] for k in batch_lib.SFT_KEYS}, mesh, rules)
        metrics, norm = tf_fn(params, dev)
        metrics, norm = jax.device_get(metrics), jax.device_get(norm)
        for k, w in _WEIGHT.items():
            sums[k] = sums.get(k, 0.0) + float(metrics[k]) * float(norm[w])
            dens[k] = dens.get(k, 0.0) + float(norm[w])
        rows = decode_lib.unbatch(gen_fn({"params": params}, dev), tokenizer.evi_id)
        for r, row in enumerate(rows):
            example_id = int(host["example_id"][r])
            if example_id < 0:
                continue
            sample = by_index[example_id]
            ids = row.token_ids
            end_evi = [k for k, t in enumerate(ids) if t == tokenizer.evi_end_id]
            grounding = [iv for k, iv in zip([k for k, t in enumerate(ids) if t == tokenizer.evi_id],
                                            row.evidence_intervals) if end_evi and k < end_evi[0]]
            gt = [tuple(int(x) for x in host["event_intervals"][r, k]) for k in range(host["event_valid"].shape[1])
                  if host["event_valid"][r, k]]
            iou = span_iou(grounding[0], gt[0]) if grounding and gt else 0.0
            if sample.task == "tvg":
                ious.append(iou)
            # answer text after </evi> (evidence tokens excluded) vs the ground truth's
            gt_ids = [int(t) for t, v in zip(host["response_ids"][r], host["response_valid"][r]) if v]
            gt_end = gt_ids.index(tokenizer.evi_end_id) if tokenizer.evi_end_id in gt_ids else -1
            gt_answer = [t for t in gt_ids[gt_end + 1:] if t != tokenizer.evi_id]
            answer = [t for t in ids[(end_evi[0] + 1 if end_evi else 0):] if t != tokenizer.evi_id]
            answer_hits += int(answer == gt_answer)
            answer_total += 1
            if predictions is not None:
                text, seconds = decode_lib.render_answer(
                    ids, row.evidence_intervals, lambda t: tokenizer.decode(t), host["frame_times"][r],
                    evi_token_id=tokenizer.evi_id, evi_end_token_id=tokenizer.evi_end_id,
                    stop_token_ids=(tokenizer.end_id, tokenizer.pad_id))
                predictions.append({"index": example_id, "video": sample.video, "task": sample.task,
                                    "question": sample.question, "gt_answer": sample.answer,
                                    "gt_events": [list(e) for e in sample.events], "prediction": text,
                                    "grounding_seconds": [list(s) for s in seconds],
                                    "grounding_frames": [list(g) for g in grounding], "gt_frames": [list(g) for g in gt],
                                    "iou": iou})
    out = {f"tf/{k}": sums[k] / max(dens[k], 1.0) for k in sums}
    for t in THRESHOLDS:
        out[f"tvg/R@{t}"] = float(np.mean([i >= t for i in ious])) if ious else 0.0
    out["tvg/mIoU"] = float(np.mean(ious)) if ious else 0.0
    out["tvg/num"] = float(len(ious))
    out["answer/exact_match"] = answer_hits / max(answer_total, 1)
    return out


def format_metrics(m: Mapping[str, float]) -> str:
    keys = ["tvg/R@0.3", "tvg/R@0.5", "tvg/R@0.7", "tvg/mIoU", "answer/exact_match", "tf/grounding/accuracy",
            "tf/loss/lm"]
    return " ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def final_report(config: ml_collections.ConfigDict, model: D2VLM, params: Any, tokenizers, mesh,
                 workdir: str) -> dict[str, Any]:
    """Full held-out evaluation: predictions JSON, metrics JSON and a printed table with the
    video-blind baseline next to the model."""
    predictions: list = []
    metrics = evaluate(config, model, params, "final", tokenizers, mesh, predictions=predictions)
    from d2vlm_jax.data.synthetic import blind_baseline
    train = schema.load_annotations(config.data.train_annotations, on_error="skip")
    val = schema.load_annotations(config.data.eval_annotations, on_error="skip")
    blind = blind_baseline(train, val)
    report = {"model": metrics, "video_blind": blind}
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "predictions.json"), "w") as f:
            json.dump(predictions, f, indent=1)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(render_table(metrics, blind), flush=True)
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

