r"""Evaluates a D²VLM checkpoint on an annotation file (SPEC §6).

Examples:
  # the synthetic held-out split (same numbers as the training run's final report)
  python launch/evaluate.py --checkpoint workdir/synthetic --annotations data/synthetic/val.json \
      --output_dir /tmp/eval_synthetic
  # Charades-STA test split ({"video", "duration", "query", "timestamp"} records)
  python launch/evaluate.py --checkpoint /ckpt/d2vlm --benchmark charades \
      --annotations charades_test.json --video_root /data/charades/videos --batch_size 8
  # E.T. Bench ({"idx", "task", "source", "video", "duration", "q", "o", "p", "tgt", "g"})
  python launch/evaluate.py --checkpoint /ckpt/d2vlm --benchmark etbench \
      --annotations etbench_txt_v1.0.json --video_root /data/etbench/videos

Benchmarks:
  synthetic  annotations in the project schema (SPEC §2.3); tvg R@{0.3,0.5,0.7} + mIoU,
             answer exact match and teacher-forced metrics: the code of the training run's
             final report (train/evaluation.py), with the video-blind reference when the
             checkpoint is a training workdir.
  charades   Charades-STA: R@{0.3,0.5,0.7}, mIoU.
  youcook2   YouCook2 dense captioning ({"video", "duration", "timestamps", "sentences"}):
             P/R/F1 over IoU {0.3,0.5,0.7,0.9} + CIDEr-D.
  etbench    E.T. Bench: per-task metrics per source and the merged scores.

Benchmark records are converted to the project schema (data/converters.py; E.T. Bench: the
question ``q`` with an empty answer), the same generation pass runs over them, and the
rendered answers (SPEC §5.4) are scored in the E.T. Bench record format by the scoring
protocol of --protocol (d2vlm_jax/evaluation/scoring.py, the code of launch/score.py). A sample whose video cannot be used is scored as a miss (empty answer) and counted.

Sharding: every process takes its slice of the file (``[process::process_count]``) and
the global batch of --batch_size rows is spread over the mesh's data axes. Multi-process
runs merge the per-process predictions through --output_dir (a shared filesystem).
Writes <output_dir>/predictions.json and metrics.json and prints a table.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from d2vlm_jax import cli  # noqa: E402

BENCHMARKS = ("synthetic", "etbench", "charades", "youcook2")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory (workdir, stage export or imported).")
_STAGE = flags.DEFINE_string("stage", None, "Stage of a training workdir (default: the last finished one).")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "Annotation file (JSON list).")
_VIDEO_ROOT = flags.DEFINE_string("video_root", None, "Directory the videos are relative to (default: the "
                                  "annotation file's directory).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where predictions.json / metrics.json go "
                                  "(default: ./eval_<benchmark>_<annotation file name>).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size, a multiple of the mesh data size "
                                   "(default: the training config's eval_batch_size, else the data size).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Decode steps (default: the training config's "
                                       "eval_max_new_tokens, else 256).")
_BENCHMARK = flags.DEFINE_enum("benchmark", "synthetic", BENCHMARKS, "Annotation format and metrics.")
_QFORMER_VOCAB = flags.DEFINE_string("qformer_vocab", None, "Q-Former vocab.txt overriding the checkpoint's.")
_SENTSIM = flags.DEFINE_string("sentsim", "auto", "Sentence similarity for SentSim and the multiple-choice "
                               "fallback: auto (all-MiniLM-L6-v2 when installed), minilm (required), none.")
_PROTOCOL = flags.DEFINE_string("protocol", None, "Scoring protocol (launch/score.py, docs/EVALUATION.md); "
                                "default: d2vlm for etbench (the authors' new_compute_metrics.py), "
                                "d2vlm_jax (the project's rules) for charades / youcook2.")
DEFAULT_PROTOCOL = {"etbench": "d2vlm", "charades": "d2vlm_jax", "youcook2": "d2vlm_jax"}
_DECODING = flags.DEFINE_string("decoding", None, "Decoding preset (d2vlm_jax/inference/presets.py): authors (the "
                                "authors' E.T. Bench settings: sampling T=0.2, top-k 50, 2048 tokens, per-task "
                                "repetition penalty, float16, span tie rule) or greedy. Default: authors for "
                                "--protocol d2vlm / d2vlm_looser, greedy otherwise.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "The model's compute dtype "
                           "(default: the preset's: float16 for authors, float32 for greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (presets that sample).")
AUTHORS_DECODING_PROTOCOLS = ("d2vlm", "d2vlm_looser")
# Protocols that read the answer the way the authors' inference writes it (``a``: their
# detokenized text with frame-index <evi> and the grounding stage); the project's own
# protocol reads the project's rendering (seconds, answer stage).
PROJECT_TEXT_PROTOCOLS = ("d2vlm_jax",)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["checkpoint", "annotations"])


fail = cli.fail


# ----------------------------------------------------------------------------- benchmark records


def to_schema(records, benchmark: str, file: str):
    """Benchmark records -> (project-schema samples, index of each in ``records``, skipped count)."""
    from d2vlm_jax.data import converters, schema

    if benchmark == "etbench":
        def convert(record, *, file, index, report):
            if not isinstance(record, dict):
                raise schema.AnnotationError(file, index, "<sample>", "expected a JSON object")
            for key in ("video", "duration", "task", "q"):
                if key not in record:
                    raise schema.AnnotationError(file, index, key, "missing required field")
            question = str(record["q"]).replace(schema.IMAGE_TOKEN, "").strip()
            return schema.validate_sample({"video": record["video"], "duration": record["duration"],
                                           "task": record["task"], "question": question, "answer": "",
                                           "events": [], "question_events": []}, file=file, index=index,
                                          report=report)
    else:
        convert = converters.CONVERTERS["charades_sta" if benchmark == "charades" else "dense_captions"]
    report = schema.ValidationReport()
    pairs = list(schema.iter_checked(records, convert, file=file, on_error="skip", report=report))
    return [s for _, s in pairs], [i for i, _ in pairs], report.num_skipped


def answer_text(prediction: dict | None, protocol: str) -> str:
    """The text ``a`` a protocol scores: the authors' text, or the project's rendering."""
    if prediction is None:
        return ""
    if protocol in PROJECT_TEXT_PROTOCOLS:
        return prediction["prediction"]
    return prediction["authors_text"] or ""


def structured_fields(prediction: dict | None) -> dict:
    """The project's fields stored next to ``a`` in the authors'-layout file."""
    if prediction is None:
        return {"missing": True}
    keys = ("prediction", "grounding_seconds", "grounding_frames", "evidence_frames", "finished", "num_frames")
    return {k: prediction[k] for k in keys}


def benchmark_record(benchmark: str, raw: dict, answer: str, position: int) -> dict:
    """The E.T. Bench-format record the scoring protocols read."""
    if benchmark == "charades":
        return {"idx": position, "task": "charades_sta", "video": raw["video"], "a": answer,
                "tgt": raw["timestamp"]}
    if benchmark == "youcook2":
        return {"idx": position, "task": "youcook2_dvc", "video": raw["video"], "a": answer,
                "tgt": raw["timestamps"], "g": raw["sentences"]}
    record = {k: raw[k] for k in ("idx", "task", "source", "video", "tgt", "o", "p", "g") if k in raw}
    record.setdefault("idx", position)
    record["a"] = answer
    return record


# ----------------------------------------------------------------------------- main


def main(argv):
    del argv  # cli.run rejects positional arguments
    import jax
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    if not os.path.exists(_CHECKPOINT.value):
        fail(f"checkpoint directory {_CHECKPOINT.value} does not exist")
    if not os.path.isfile(_ANNOTATIONS.value):
        fail(f"annotation file {_ANNOTATIONS.value} not found")
    try:
        with open(_ANNOTATIONS.value, encoding="utf-8") as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"--annotations={_ANNOTATIONS.value}: not valid JSON ({e}); fix the file or pass another one")
    import ml_collections
    import numpy as np
    from d2vlm_jax import config as cfg_lib
    from d2vlm_jax import losses
    from d2vlm_jax.data import pipeline, schema
    from d2vlm_jax.evaluation import records as records_lib
    from d2vlm_jax.evaluation import scoring
    from d2vlm_jax.inference import runner
    from d2vlm_jax.train import evaluation
    from d2vlm_jax.train.progress import PassProgress, format_seconds

    from d2vlm_jax.inference import presets
    from d2vlm_jax.models.d2vlm import D2VLM

    benchmark = _BENCHMARK.value
    protocol = None
    if benchmark != "synthetic":
        try:
            protocol = scoring.get_protocol(_PROTOCOL.value or DEFAULT_PROTOCOL[benchmark]).name
            similarity, similarity_name = None, "not needed"
            if benchmark == "etbench":  # multiple choice and captions use it
                similarity, similarity_name = scoring.resolve_similarity(_SENTSIM.value)
        except scoring.ScoringError as e:
            fail(str(e))
    is_main = jax.process_index() == 0
    pindex, pcount = jax.process_index(), jax.process_count()
    try:
        loaded = runner.load_checkpoint(_CHECKPOINT.value, stage=_STAGE.value, qformer_vocab=_QFORMER_VOCAB.value)
    except runner.CheckpointError as e:
        fail(str(e))
    experiment = loaded.layout.experiment_config
    annotations = os.path.abspath(_ANNOTATIONS.value)
    out_dir = _OUTPUT_DIR.value or os.path.join(
        os.getcwd(), f"eval_{benchmark}_{os.path.splitext(os.path.basename(annotations))[0]}")
    os.makedirs(out_dir, exist_ok=True)
    cli.add_log_file(os.path.join(out_dir, "evaluate.log" if pcount == 1 else f"evaluate.process_{pindex}.log"))
    dp = loaded.data_parallel_size
    batch_size = _BATCH_SIZE.value or (experiment.get("eval_batch_size") if experiment is not None else None) or dp
    if batch_size % dp or batch_size % pcount:
        fail(f"--batch_size={batch_size} must be a multiple of the mesh data size {dp} and of the "
             f"{pcount} processes")
    try:
        preset = presets.get_preset(_DECODING.value or ("authors" if protocol in AUTHORS_DECODING_PROTOCOLS
                                                        else "greedy"))
    except ValueError as e:
        fail(str(e))
    dtype = _DTYPE.value or preset.dtype
    max_new_tokens = _MAX_NEW_TOKENS.value or preset.max_new_tokens or (
        experiment.get("eval_max_new_tokens") if experiment is not None else None) or 256
    decode_config = presets.decode_config(preset, loaded.tokenizer, max_new_tokens=max_new_tokens, dtype=dtype)
    model = D2VLM(presets.with_compute_dtype(loaded.model_config, dtype))
    decoding = {"preset": preset.to_json(), "dtype": dtype, "max_new_tokens": max_new_tokens, "seed": _SEED.value,
                "interval_arithmetic": decode_config.interval_arithmetic,
                "stop_token_ids": list(decode_config.all_stop_ids)}

    raw_records, raw_index, num_invalid = None, None, 0
    eval_path = annotations
    try:
        if benchmark != "synthetic":
            with open(annotations) as f:
                raw_records = json.load(f)
            if not isinstance(raw_records, list):
                fail(f"{annotations}: expected a JSON list of records")
            samples, raw_index, num_invalid = to_schema(raw_records, benchmark, os.path.basename(annotations))
            if not samples:
                fail(f"{annotations}: no record could be converted for --benchmark={benchmark} ({num_invalid} invalid)")
            eval_path = os.path.join(out_dir, f"converted_annotations.process_{pindex}.json")
            with open(eval_path, "w") as f:
                json.dump([s.to_dict() for s in samples], f)
    except schema.AnnotationError as e:
        fail(str(e))

    data = ml_collections.ConfigDict(loaded.data_config.to_dict())
    data.eval_annotations = eval_path
    data.video_root = _VIDEO_ROOT.value or os.path.dirname(annotations)
    data.source = "videos"
    loss_config = None
    if benchmark == "synthetic":
        loss_config = cfg_lib.loss_config(experiment) if experiment is not None else losses.LossConfig()

    num_samples = len(pipeline.read_annotations(eval_path)[0])
    if is_main:
        print(f"evaluating {loaded.layout.params_dir} on {annotations} ({benchmark}, {num_samples} samples, "
              f"{pcount} process(es), {jax.device_count()} device(s), global batch {batch_size}, "
              f"decoding {preset.name} in {dtype}, max_new_tokens {max_new_tokens})", flush=True)
    start = time.time()
    progress = PassProgress("[eval]", enabled=is_main)
    stats = pipeline.PipelineStats()
    predictions: list = []
    try:
        with jax.set_mesh(loaded.mesh):
            metrics = evaluation.evaluate_annotations(
                model, loaded.params, data_config=data, tokenizers=loaded.tokenizers, mesh=loaded.mesh,
                global_batch_size=batch_size, max_new_tokens=max_new_tokens, loss_config=loss_config,
                predictions=predictions, progress=progress, stats=stats, decode_config=decode_config,
                penalty_for_task=lambda task: preset.penalties([task])[0], seed=_SEED.value)
    except pipeline.DataError as e:
        fail(f"{e} (--video_root={data.video_root})")
    finally:
        progress.close()

    # merge the per-process predictions (shared output directory)
    if pcount > 1:
        from jax.experimental import multihost_utils
        with open(os.path.join(out_dir, f"predictions.process_{pindex}-of-{pcount}.json"), "w") as f:
            json.dump(predictions, f)
        multihost_utils.sync_global_devices("evaluate: predictions written")
        if not is_main:
            return
        predictions = []
        for i in range(pcount):
            with open(os.path.join(out_dir, f"predictions.process_{i}-of-{pcount}.json")) as f:
                predictions += json.load(f)
    predictions.sort(key=lambda p: p["index"])
    if not is_main:
        return

    if benchmark == "synthetic":
        blind = {}
        if experiment is not None and os.path.isfile(data.get("train_annotations") or ""):
            blind = evaluation.video_blind_reference(data.train_annotations, annotations)
        evaluation.write_report(metrics, blind, predictions, out_dir, decoding=decoding)
        print(f"elapsed {format_seconds(time.time() - start)}", flush=True)
        return

    by_index = {p["index"]: p for p in predictions}
    records, authors_layout, missing = [], [], 0
    for k, raw_position in enumerate(raw_index):
        prediction = by_index.get(k)
        missing += prediction is None
        records.append(benchmark_record(benchmark, raw_records[raw_position], answer_text(prediction, protocol),
                                        raw_position))
        authors_layout.append(presets.authors_record(
            raw_records[raw_position], answer_text(prediction, "authors"),
            0 if prediction is None else prediction["prompt_tokens"], structured_fields(prediction)))
    unrendered = sum(1 for p in predictions if p["authors_text"] is None)
    try:
        document = scoring.score_records(records, protocol, similarity=similarity,
                                         similarity_name=similarity_name)
    except (records_lib.EvaluationInputError, ValueError) as e:
        fail(f"{annotations}: {e}")
    result = document.pop("result")
    result["num_invalid_annotations"] = num_invalid
    result["num_skipped_videos"] = missing
    skipped = {k.split("/")[-1]: int(v) for k, v in metrics.items() if k.startswith("samples/skipped/")}
    if num_invalid:
        skipped["invalid_annotation"] = num_invalid
    result["samples"] = {"seen": len(raw_records), "scored": len(records), "evaluated": len(records) - missing,
                         "skipped": skipped}
    if num_invalid or missing:
        result["notes"].append(f"{num_invalid} invalid annotation(s) left out; {missing} sample(s) whose video "
                               f"could not be used scored as misses")
    if unrendered:
        result["notes"].append(f"{unrendered} answer(s) spell a literal <evi> with ordinary tokens: their "
                               f"authors' text is empty (the authors' detokenize would assert)")
    # the authors' layout alone in its own folder: their scripts read every .json of --pred_path
    authors_dir = os.path.join(out_dir, benchmark)
    os.makedirs(authors_dir, exist_ok=True)
    with open(os.path.join(authors_dir, f"{benchmark}_predictions.json"), "w") as f:
        json.dump(authors_layout, f, indent=1)
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:
        json.dump(predictions, f, indent=1)
    with open(os.path.join(out_dir, "benchmark_records.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"benchmark": benchmark, **document, "decoding": decoding, "result": result,
                   "generation": metrics}, f, indent=2,
                  default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    print(scoring.format_table({**document, "result": result}), flush=True)
    counts = result["samples"]
    print(f"{counts['seen']} records seen, {counts['scored']} scored ({counts['evaluated']} generated; skipped: "
          + (", ".join(f"{k} {v}" for k, v in counts["skipped"].items()) or "none")
          + "; unusable videos are scored as misses, invalid records left out)", flush=True)
    print(f"predictions: {out_dir}/predictions.json  records: {out_dir}/benchmark_records.json  "
          f"authors' layout: {authors_dir}/  metrics: {out_dir}/metrics.json  "
          f"(elapsed {format_seconds(time.time() - start)})", flush=True)


if __name__ == "__main__":
    cli.run(main)
