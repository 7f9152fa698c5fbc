"""launch/infer.py and launch/evaluate.py end to end on a tiny checkpoint, the checkpoint
loader's layouts and errors, the evidence plot, and skipped samples scored as misses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.crafted import crafted_workdir
from tests.smoke_data import smoke_config as shared_smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "launch", "infer.py")
EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")
NUM_DEVICES = 8


def run_launcher(script, *args, devices=NUM_DEVICES, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def smoke_config(data_dir):
    cfg = shared_smoke_config(data_dir)
    cfg.stages = ("sft",)
    cfg.eval_batch_size = NUM_DEVICES      # one row per fake device
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Smoke data + a training workdir with crafted params (tests/crafted.py)."""
    return crafted_workdir(tmp_path_factory.mktemp("ie_data"), tmp_path_factory.mktemp("ie_workdir"),
                           smoke_config)


# ----------------------------------------------------------------------------- loader


def test_locate_checkpoint_layouts_and_errors(checkpoint, tmp_path):
    from d2vlm_jax.inference import runner

    wd = checkpoint["workdir"]
    layout = runner.locate_checkpoint(wd)
    assert layout.kind == "workdir" and layout.stage == "sft"
    assert layout.params_dir == os.path.join(wd, "sft", "export", "params")
    for given in (os.path.join(wd, "sft"), os.path.join(wd, "sft", "export"),
                  os.path.join(wd, "sft", "export", "params")):
        other = runner.locate_checkpoint(given)
        assert other.kind == "export" and other.params_dir == layout.params_dir and other.workdir == wd
    # an imported checkpoint: params/ + d2vlm_config.json + tokenizer files, no training config
    imported = tmp_path / "imported"
    shutil.copytree(os.path.join(wd, "sft", "export"), imported)
    with pytest.raises(runner.CheckpointError, match="tokenizer.json"):
        runner.load_checkpoint(imported)
    shutil.copy(os.path.join(checkpoint["data_dir"], "tokenizer.json"), imported)
    with pytest.raises(runner.CheckpointError, match="vocab.txt"):
        runner.load_checkpoint(imported)
    shutil.copy(os.path.join(checkpoint["data_dir"], "vocab.txt"), imported)
    loaded = runner.load_checkpoint(imported)
    assert loaded.layout.kind == "imported" and loaded.model_config == dataclasses_replace_rules(
        checkpoint["model_cfg"], loaded.model_config)
    # the workdir without d2vlm_config.json (runs before the export wrote it): rebuilt from config.json
    old = tmp_path / "old_run"
    shutil.copytree(wd, old)
    os.remove(old / "sft" / "export" / "d2vlm_config.json")
    assert runner.locate_checkpoint(old).model_config_dir is None
    assert runner.load_checkpoint(old).model_config == checkpoint["model_cfg"]
    # errors name what is missing
    with pytest.raises(runner.CheckpointError, match="does not exist"):
        runner.locate_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(runner.CheckpointError, match="no params/"):
        runner.locate_checkpoint(tmp_path / "empty")
    os.remove(imported / "d2vlm_config.json")
    with pytest.raises(runner.CheckpointError, match="no d2vlm_config.json"):
        runner.locate_checkpoint(imported)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(wd, "config.json"), unfinished)
    with pytest.raises(runner.CheckpointError, match="no exported params"):
        runner.locate_checkpoint(unfinished)


def dataclasses_replace_rules(expected, loaded):
    """``expected`` with the sharding rules of ``loaded`` (d2vlm_config.json leaves them out)."""
    import dataclasses
    return dataclasses.replace(expected, llm=dataclasses.replace(expected.llm,
                                                                 sharding_rules=loaded.llm.sharding_rules))


def test_params_that_do_not_fit_are_named(checkpoint, tmp_path):
    from d2vlm_jax.inference import runner
    from d2vlm_jax.weights.d2vlm_checkpoint import save_model_config
    import dataclasses

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint["workdir"], bad)
    cfg = checkpoint["model_cfg"]
    save_model_config(bad / "sft" / "export", dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, intermediate_size=cfg.llm.intermediate_size * 2)))
    with pytest.raises(runner.CheckpointError, match="shape mismatch for llm/layers_0/mlp"):
        runner.load_checkpoint(bad)


# ----------------------------------------------------------------------------- plot


def test_evidence_figure_draws_curve_threshold_interval_and_truth(tmp_path):
    import matplotlib.colors as mcolors
    from d2vlm_jax import visualize
    from d2vlm_jax.inference.runner import Evidence

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    curve = np.linspace(0.1, 0.9, 10).astype(np.float32)
    evidence = [Evidence((6, 9), (6.0, 9.0), "grounding", curve), Evidence((2, 3), (2.0, 3.0), "answer", None)]
    fig = visualize.evidence_figure(frames, np.arange(10.0), evidence, title="a title", ground_truth=[(5.0, 8.0)])
    strip, first, second = fig.axes
    assert len(strip.images) == 8                      # thumbnails
    line = first.lines[0]
    np.testing.assert_allclose(line.get_ydata(), curve)
    threshold = [ln for ln in first.lines if ln.get_linestyle() == "--"][0]
    np.testing.assert_allclose(threshold.get_ydata(), [0.6 * 0.9] * 2, rtol=1e-6)
    spans = sorted(p.get_x() for p in first.patches)   # chosen frames 6..9 (half a frame each side), truth 5..8
    np.testing.assert_allclose(spans, [5.0, 5.5])
    labels = [t.get_text() for t in first.get_legend().get_texts()]
    assert any("chosen interval: frames 6-9" in t for t in labels) and any("ground truth: 5-8 s" in t for t in labels)
    assert any("threshold 0.6" in t for t in labels) and any("p(frame" in t for t in labels)
    assert second.get_xlabel() == "time in the video (s)" and first.get_ylabel() == "probability"
    assert mcolors.to_hex(first.patches[0].get_facecolor()) == visualize.CHOSEN_COLOR
    headers = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}
    for ext, header in headers.items():
        path = visualize.save_figure(visualize.evidence_figure(frames, np.arange(10.0), evidence), tmp_path / f"e.{ext}")
        assert open(path, "rb").read(5).startswith(header), ext
    with pytest.raises(ValueError, match="use .png, .svg or .pdf"):
        visualize.save_figure(visualize.evidence_figure(frames, np.arange(10.0), evidence), tmp_path / "e.jpg")
    many = visualize.evidence_figure(frames, np.arange(10.0), evidence * 5, max_panels=3)
    assert len(many.axes) == 4 and "the first 3 of 10" in many.axes[0].get_title(loc="left")


def test_training_never_imports_plotting():
    code = ("import sys; import d2vlm_jax.train.loop, d2vlm_jax.train.evaluation, d2vlm_jax.inference.runner; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


# ----------------------------------------------------------------------------- launchers


def test_infer_end_to_end_with_plot(checkpoint, tmp_path):
    samples = json.load(open(os.path.join(checkpoint["data_dir"], "val.json")))
    tvg = next(s for s in samples if s["task"] == "tvg")
    video = os.path.join(checkpoint["data_dir"], tvg["video"])
    png = tmp_path / "evidence.png"
    truth = "-".join(str(x) for x in tvg["events"][0])
    result = run_launcher(INFER, "--checkpoint", checkpoint["workdir"], "--video", video, "--question",
                          tvg["question"], "--max_new_tokens", 12, "--plot", png, "--ground_truth", truth, devices=1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # the crafted params answer <evi></evi><|end|>: one grounding interval, an empty answer
    assert "answer: " in lines
    grounded = [line for line in lines if line.startswith("grounded intervals (s): ")]
    evi = [line for line in lines if line.strip().startswith("<evi> 1 [grounding] frames ")]
    assert len(grounded) == 1 and len(evi) == 1 and not any("<evi> 2" in line for line in lines)
    start, end = (float(x) for x in grounded[0].split(": ")[1].split(" - "))
    assert 0.0 <= start <= end <= tvg["duration"] and f"= {start:.1f} - {end:.1f} s" in evi[0]
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    def info_lines(text):
        return [line for line in text.splitlines() if line[:1] == "I" and line[1:5].isdigit()]
    assert not info_lines(result.stderr)            # quiet by default ...
    verbose = run_launcher(INFER, "--checkpoint", checkpoint["workdir"], "--video", video, "--question",
                           tvg["question"], "--max_new_tokens", 4, "--json", "--verbosity=0", devices=1)
    assert verbose.returncode == 0 and info_lines(verbose.stderr)   # ... library INFO logs on request
    assert json.loads(verbose.stdout.strip().splitlines()[-1])["grounding_seconds"]


def test_infer_input_errors_are_one_line(checkpoint, tmp_path):
    """Ordinary mistakes with infer.py: one line on stderr, exit code 2."""
    samples = json.load(open(os.path.join(checkpoint["data_dir"], "val.json")))
    video = os.path.join(checkpoint["data_dir"], samples[0]["video"])
    duration = samples[0]["duration"]
    base = ("--checkpoint", checkpoint["workdir"], "--video", video, "--max_new_tokens", 4)
    cases = [
        (("--question", "What is at <evi>?", "--question_events", "50-60"), "outside the video"),
        (("--question", "What is at <evi>?", "--question_events", "3-x"), "is not 'start-end'"),
        (("--question", "q", "--ground_truth", f"0-{duration + 5}"), "outside the video"),
        (("--question", " ".join(["word"] * 400)), "field 'question': prompt too long"),
        (("--question", "What is at <evi>?"), "field 'question_events'"),
        (("--question", "q", "--plot", tmp_path / "x.jpg"), "use a .png, .svg or .pdf"),
        (("--question", "q", "--max_new_tokens", "many"), "--max_new_tokens"),
    ]
    for extra, expected in cases:
        r = run_launcher(INFER, *base, *extra, devices=1)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (
            extra, r.returncode, r.stderr[-2000:])
    help_text = run_launcher(INFER, "--help", devices=1).stdout
    assert "val_00003.mp4" in help_text and "val_0003.mp4" not in help_text


def test_unicode_question_warns_and_explains_missing_grounding(checkpoint):
    """Characters outside the tokenizer's vocabulary are named; an answer without a grounding
    stage says so instead of a bare 'none'."""
    from d2vlm_jax.inference import runner
    loaded = runner.load_checkpoint(checkpoint["workdir"])
    assert runner.unknown_characters(loaded.tokenizer, "When is the yellow circle visible?") == []
    assert runner.unknown_characters(loaded.tokenizer, "When is the circle visible? ✓ ü") == ["✓", "ü"]
    assert "'✓ü'" in runner.question_warnings(loaded, "When ✓ ü?")[0]
    answer_only = runner.InferenceResult("0.0 - 0.0.", [], [runner.Evidence((0, 0), (0.0, 0.0), "answer", None)], "",
                                         [], True, np.zeros(3))
    assert "skipped the grounding stage" in runner.describe_grounding(answer_only)
    assert runner.describe_grounding(dataclasses_replace(answer_only, evidence=[])) == (
        "none (the answer has no <evi> token)")


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_launcher_errors_are_clear(checkpoint, tmp_path):
    missing = run_launcher(INFER, "--checkpoint", tmp_path / "nope", "--video", "x.mp4", "--question", "q")
    assert missing.returncode == 2 and f"checkpoint directory {tmp_path / 'nope'} does not exist" in missing.stderr
    no_video = run_launcher(INFER, "--checkpoint", checkpoint["workdir"], "--video", tmp_path / "none.mp4",
                            "--question", "q")
    assert no_video.returncode == 2 and f"video {tmp_path / 'none.mp4'}: file not found" in no_video.stderr
    no_ckpt = run_launcher(EVALUATE, "--checkpoint", tmp_path / "nope", "--annotations", "x.json")
    assert no_ckpt.returncode == 2 and "does not exist" in no_ckpt.stderr
    (tmp_path / "empty").mkdir()
    empty = run_launcher(EVALUATE, "--checkpoint", tmp_path / "empty", "--annotations",
                         os.path.join(checkpoint["data_dir"], "val.json"))
    assert empty.returncode == 2 and "no params/" in empty.stderr
    # malformed annotation JSON, and a --video_root under which no video exists: one line each
    broken = tmp_path / "broken.json"
    broken.write_text('[{"video": "videos/val_00000.mp4",')
    for benchmark in ("synthetic", "charades"):
        r = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations", broken,
                         "--benchmark", benchmark, "--output_dir", tmp_path / "o")
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and str(broken) in err[0] and "not valid JSON" in err[0], r.stderr
    r = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations",
                     os.path.join(checkpoint["data_dir"], "val.json"), "--video_root", tmp_path / "nowhere",
                     "--output_dir", tmp_path / "o")
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(err) == 1 and "every one of the 9 samples" in err[0], r.stderr[-3000:]
    assert "video_not_found 9" in err[0] and f"--video_root={tmp_path / 'nowhere'}" in err[0]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_evaluate_matches_training_evaluation(checkpoint, tmp_path):
    """evaluate.py on the smoke val set == train/evaluation.py's evaluate() for the same params,
    set up as train/loop.py's final evaluation sets it up."""
    import jax
    from d2vlm_jax import sharding
    from d2vlm_jax.data import pipeline
    from d2vlm_jax.models.d2vlm import D2VLM
    from d2vlm_jax.train import checkpoint as ckpt_lib
    from d2vlm_jax.train import evaluation
    from d2vlm_jax.train.loop import abstract_boxed_variables

    out_dir = tmp_path / "eval"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    launched_process = subprocess.Popen(   # runs while the reference is computed below
        [sys.executable, EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations",
         os.path.join(checkpoint["data_dir"], "val.json"), "--output_dir", str(out_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg, model_cfg = checkpoint["config"], checkpoint["model_cfg"]
    tokenizers = pipeline.load_tokenizers(cfg.data)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    params = ckpt_lib.load_params(os.path.join(checkpoint["workdir"], "sft", "export", "params"))
    reference_predictions: list = []
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.shardings_for(abstract_boxed_variables(model_cfg), mesh,
                                                               model_cfg.llm.sharding_rules)["params"])
        reference = evaluation.evaluate(cfg, D2VLM(model_cfg), params, "final", tokenizers, mesh,
                                        predictions=reference_predictions)
    stdout, stderr = launched_process.communicate(timeout=300)
    assert launched_process.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "[eval] batch 2/2 (100%)" in stdout and "ETA" in stdout and "held-out evaluation" in stdout
    launched = json.load(open(out_dir / "metrics.json"))
    predictions = json.load(open(out_dir / "predictions.json"))

    # not vacuous: every sample got a grounding interval from the model, IoUs are not all 0
    assert reference["tvg/num"] == 3.0 and reference["tvg/mIoU"] > 0
    assert all(len(p["grounding_frames"]) == 1 for p in reference_predictions) and len(reference_predictions) == 9
    assert launched["model"] == reference   # the same code path: bit-identical numbers
    assert predictions == sorted(reference_predictions, key=lambda p: p["index"])
    assert "most_common_train_interval" in launched["video_blind"]


def test_evaluate_scores_skipped_samples_as_misses(checkpoint, tmp_path):
    """A sample whose video is missing stays in every denominator (IoU 0, no answer match) and
    metrics.json counts it: seen / scored / evaluated / skipped by reason."""
    samples = json.load(open(os.path.join(checkpoint["data_dir"], "val.json")))
    gone = next(k for k, s in enumerate(samples) if s["task"] == "tvg")
    samples[gone] = dict(samples[gone], video="videos/missing.mp4")
    samples.append({"video": "videos/x.mp4", "task": "tvg"})           # invalid: no duration, question...
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps(samples))
    os.symlink(os.path.join(checkpoint["data_dir"], "videos"), tmp_path / "videos")
    r = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations", annotations,
                     "--output_dir", tmp_path / "out", "--max_new_tokens", 6)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    model = json.load(open(tmp_path / "out" / "metrics.json"))["model"]
    predictions = json.load(open(tmp_path / "out" / "predictions.json"))
    num_tvg = sum(s.get("task") == "tvg" and "duration" in s for s in samples)
    assert model["tvg/num"] == num_tvg == 3 and len(predictions) == 8 and gone not in [p["index"] for p in predictions]
    tvg_ious = [p["iou"] for p in predictions if p["task"] == "tvg"]
    assert len(tvg_ious) == 2 and model["tvg/mIoU"] == pytest.approx((sum(tvg_ious) + 0.0) / 3)
    assert model["samples/seen"] == 10 and model["samples/scored"] == 9 and model["samples/evaluated"] == 8
    assert model["samples/skipped/video_not_found"] == 1 and model["samples/skipped/invalid_annotation"] == 1
    assert "10 samples seen, 9 scored (2 skipped: video_not_found 1, invalid_annotation 1" in r.stdout


def test_evaluate_charades_benchmark(checkpoint, tmp_path):
    """A Charades-STA-format file: converted, generated, scored by the d2vlm_jax protocol (R@0.3/0.5/0.7, mIoU)."""
    from d2vlm_jax.evaluation.protocols import project as metrics_lib

    samples = [s for s in json.load(open(os.path.join(checkpoint["data_dir"], "val.json"))) if s["task"] == "tvg"]
    records = [{"video": s["video"], "duration": s["duration"], "query": f"the {k} thing.",
                "timestamp": s["events"][0]} for k, s in enumerate(samples)]
    records.append({"video": "videos/missing.mp4", "duration": 5.0, "query": "gone", "timestamp": [1, 2]})
    records.append({"video": "videos/bad.mp4", "duration": 5.0, "timestamp": [1, 2]})   # no query: invalid
    annotations = tmp_path / "charades.json"
    annotations.write_text(json.dumps(records))
    result = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations", annotations,
                          "--video_root", checkpoint["data_dir"], "--benchmark", "charades",
                          "--output_dir", tmp_path / "out", "--max_new_tokens", 12)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))["result"]
    bench = json.load(open(tmp_path / "out" / "benchmark_records.json"))
    assert len(bench) == 4 and bench[-1]["a"] == "" and metrics["num_skipped_videos"] == 1
    assert metrics["num_invalid_annotations"] == 1
    assert metrics["samples"] == {"seen": 5, "scored": 4, "evaluated": 3,
                                  "skipped": {"video_not_found": 1, "invalid_annotation": 1}}
    charades = metrics["tasks"]["charades_sta"]["sources"]["default"]
    assert set(charades) >= {"R@0.3", "R@0.5", "R@0.7", "mIoU"} and charades["num_samples"] == 4
    # the same records scored directly give the same numbers
    assert metrics_lib.evaluate_predictions(bench)["tasks"]["charades_sta"]["sources"]["default"] == charades
    assert "charades_sta" in result.stdout and "R@0.5" in result.stdout


def test_etbench_conversion_and_scoring():
    """E.T. Bench records -> project samples (question from ``q``, <image> removed) and back to
    scored records with the model's answers."""
    import importlib.util
    from d2vlm_jax.evaluation.protocols import project as metrics_lib

    spec = importlib.util.spec_from_file_location("ie_evaluate_launcher", EVALUATE)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    raw = [{"idx": 7, "task": "tvg", "source": "charades_sta", "video": "a.mp4", "duration": 10.0,
            "q": "<image>\nWhen does the man sit down?", "tgt": [[2.0, 4.0]]},
           {"idx": 8, "task": "rar", "source": "perception_test", "video": "b.mp4", "duration": 8.0,
            "q": "Which action happens first? (A) sit (B) run", "o": ["sit", "run"], "p": 1},
           {"idx": 9, "task": "tvg", "video": "c.mp4", "q": "no duration given"}]
    samples, index, invalid = launcher.to_schema(raw, "etbench", "etbench.json")
    assert index == [0, 1] and invalid == 1
    assert samples[0].question == "When does the man sit down?" and samples[0].answer == "" and not samples[0].events
    answers = ["It happens at 2.0 - 4.0.", "(B) run"]
    records = [launcher.benchmark_record("etbench", raw[i], a, i) for i, a in zip(index, answers)]
    assert records[0] == {"idx": 7, "task": "tvg", "source": "charades_sta", "video": "a.mp4", "tgt": [[2.0, 4.0]],
                          "a": answers[0]}
    result = metrics_lib.evaluate_predictions(records)
    assert result["tasks"]["tvg"]["score"] == 1.0 and result["tasks"]["rar"]["score"] == 1.0
    wrong = [launcher.benchmark_record("etbench", raw[i], a, i) for i, a in zip(index, ["6.0 - 9.0", "(A) sit"])]
    result = metrics_lib.evaluate_predictions(wrong)
    assert result["tasks"]["tvg"]["score"] == 0.0 and result["tasks"]["rar"]["score"] == 0.0
    from d2vlm_jax.evaluation import scoring
    document = scoring.score_records(records, "d2vlm_jax")
    assert document["result"]["tasks"] == metrics_lib.evaluate_predictions(records)["tasks"]
    assert "tvg" in scoring.format_table(document)


ETBENCH_TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")


def etbench_records(samples) -> list:
    """One E.T. Bench-layout record per task (all 12, so the authors' script's final merged
    table has every entry), on the smoke videos."""
    records = []
    for k, task in enumerate(ETBENCH_TASKS):
        s = samples[k % len(samples)]
        start, end = (float(x) for x in s["events"][0]) if s["events"] else (1.0, 3.0)
        record = {"idx": k, "task": task, "source": "synthetic", "video": s["video"], "duration": s["duration"],
                  "q": f"<image>\nQuestion for {task}?"}
        if task in ("rar", "eca", "rvq", "gvq"):
            record.update(o=["red circle", "blue square", "green star", "yellow cross"], p=k % 4)
        if task in ("tvg", "epm", "gvq"):
            record["tgt"] = [start, end]
        elif task in ("tal", "evs", "vhd", "tem"):
            record["tgt"] = [[start, end]]
        elif task in ("dvc", "slc"):
            record.update(tgt=[[start, end], [end, end + 1.0]], g=["a red circle appears.", "it moves away."])
        records.append(record)
    return records


def test_evaluate_etbench_authors_layout_and_decoding(checkpoint, tmp_path):
    """--benchmark etbench with the defaults (protocol d2vlm -> decoding 'authors' in float16):
    the authors'-layout file (input record + ``a`` + ``token length``) holds the authors'
    detokenized text (grounding stage, ``</evi>``, frame-index ``<evi>`` with its trailing
    space, ``<|end|>`` cut off), the project's d2vlm protocol parses its grounding stage, and
    metrics.json records the decoding."""
    import re

    from d2vlm_jax.evaluation import scoring

    samples = json.load(open(os.path.join(checkpoint["data_dir"], "val.json")))
    raw = etbench_records(samples)
    annotations = tmp_path / "etbench.json"
    annotations.write_text(json.dumps(raw))
    out = tmp_path / "out"
    result = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations", annotations,
                          "--video_root", checkpoint["data_dir"], "--benchmark", "etbench", "--output_dir", out,
                          "--max_new_tokens", 8, "--sentsim", "none")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "decoding authors in float16" in result.stdout
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["protocol"] == "d2vlm"
    decoding = metrics["decoding"]
    assert decoding["preset"]["name"] == "authors" and decoding["dtype"] == "float16"
    assert decoding["interval_arithmetic"] == "float16" and decoding["preset"]["interval_tie_rule"] == "span"
    assert decoding["preset"]["temperature"] == 0.2 and decoding["preset"]["top_k"] == 50
    assert os.listdir(out / "etbench") == ["etbench_predictions.json"]   # alone: the scripts read every .json
    written = json.load(open(out / "etbench" / "etbench_predictions.json"))
    assert len(written) == len(raw)
    for record, source in zip(written, raw):
        assert {k: record[k] for k in source} == source                    # the input record, unchanged
        assert isinstance(record["token length"], int) and record["token length"] > 3
        frames = record["d2vlm_jax"]["evidence_frames"]
        # the crafted model answers <evi></evi><|end|>: "first - last </evi>" in frame indices
        assert len(frames) == 1 and record["d2vlm_jax"]["finished"], record
        assert record["a"] == f"{frames[0][0]} - {frames[0][1]} </evi>", record["a"]
        assert re.fullmatch(r"\d+ - \d+ </evi>", record["a"])
        assert record["d2vlm_jax"]["grounding_frames"] == frames
    # the benchmark records scored are the same texts; the project's d2vlm protocol reads the
    # grounding stage (the *_evi metrics) and sees an empty answer stage
    bench = json.load(open(out / "benchmark_records.json"))
    assert [r["a"] for r in bench] == [r["a"] for r in written]
    again = scoring.score_records(bench, "d2vlm")["result"]
    assert {k: metrics["result"][k] for k in again} == again
    from d2vlm_jax.evaluation import etbench_answers
    for record in written:
        answer, evidence = etbench_answers.d2vlm_grounding_intervals(record["a"], "</evi>")
        assert not answer and evidence == [[float(x) for x in record["d2vlm_jax"]["evidence_frames"][0]]]
    assert metrics["result"]["tasks"]["tvg"]["sources"]["synthetic"]["Failed"] == 1    # no answer stage
    # the project's own protocol reads the project's rendering (seconds, answer stage)
    project = run_launcher(EVALUATE, "--checkpoint", checkpoint["workdir"], "--annotations", annotations,
                           "--video_root", checkpoint["data_dir"], "--benchmark", "etbench", "--output_dir",
                           tmp_path / "out2", "--max_new_tokens", 8, "--protocol", "d2vlm_jax", "--sentsim", "none")
    assert project.returncode == 0, project.stdout[-2000:] + project.stderr[-3000:]
    assert "decoding greedy in float32" in project.stdout
    assert json.load(open(tmp_path / "out2" / "metrics.json"))["decoding"]["preset"]["name"] == "greedy"
