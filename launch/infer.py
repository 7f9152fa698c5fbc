r"""Answers one question about one video with a D²VLM checkpoint (SPEC §5).

Examples:
  python launch/infer.py --checkpoint workdir/synthetic --video data/synthetic/videos/val_00003.mp4 \
      --question "When does the red square appear?" --plot /tmp/evidence.png
  python launch/infer.py --checkpoint /ckpt/d2vlm_imported --video clip.mp4 --question "..." --json

--checkpoint takes a training workdir (the last finished stage), <workdir>/<stage>/export,
or an imported authors' checkpoint (launch/import_checkpoint.py). The prompt is built as
evaluation builds it; prints the answer with every <evi> rendered as "start - end" seconds
and the grounded intervals (--json: one JSON object instead). --plot writes the evidence plot
(PNG, SVG or PDF by the extension; --ground_truth adds the true interval to it).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from d2vlm_jax import cli  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory (workdir, stage export or imported).")
_STAGE = flags.DEFINE_string("stage", None, "Stage of a training workdir (default: the last finished one).")
_VIDEO = flags.DEFINE_string("video", None, "Video file.")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_QUESTION_EVENTS = flags.DEFINE_string("question_events", "", "Intervals of the question's <evi> tokens in "
                                       "seconds, 'start-end;start-end' (e.g. 'What appears at <evi>?').")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Decode steps.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples (the authors use 0.2).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (sampling only).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FPS = flags.DEFINE_float("fps", None, "Frame sampling rate (default: the checkpoint's data config).")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Most frames sampled (default: the data config's).")
_QFORMER_VOCAB = flags.DEFINE_string("qformer_vocab", None, "Q-Former vocab.txt overriding the checkpoint's.")
_PLOT = flags.DEFINE_string("plot", None, "Write the evidence plot (frames, each <evi>'s per-frame probabilities, "
                            "threshold, chosen interval) to this .png, .svg or .pdf file.")
_GROUND_TRUTH = flags.DEFINE_string("ground_truth", "", "True intervals in seconds, 'start-end;start-end', drawn "
                                    "in the plot (e.g. the sample's 'events').")
_JSON = flags.DEFINE_boolean("json", False, "Print one JSON object instead of text.")
flags.mark_flags_as_required(["checkpoint", "video", "question"])


def main(argv):
    del argv  # cli.run rejects positional arguments
    if not os.path.exists(_CHECKPOINT.value):
        cli.fail(f"checkpoint directory {_CHECKPOINT.value} does not exist (--checkpoint)")
    if not os.path.isfile(_VIDEO.value):
        cli.fail(f"video {_VIDEO.value}: file not found (--video)")
    if _PLOT.value and os.path.splitext(_PLOT.value)[1].lower() not in (".png", ".svg", ".pdf"):
        cli.fail(f"--plot={_PLOT.value}: use a .png, .svg or .pdf file name")
    if not _QUESTION.value.strip():
        cli.fail("--question is empty")
    from d2vlm_jax.inference import runner

    try:
        question_events = runner.parse_question_events(_QUESTION_EVENTS.value)
        ground_truth = runner.parse_question_events(_GROUND_TRUTH.value)
    except ValueError as e:
        cli.fail(f"--question_events / --ground_truth: {e}")
    loaded = runner.load_checkpoint(_CHECKPOINT.value, stage=_STAGE.value, qformer_vocab=_QFORMER_VOCAB.value)
    prepared = runner.prepare_input(loaded, _VIDEO.value, _QUESTION.value, question_events=question_events,
                                    fps=_FPS.value, max_frames=_MAX_FRAMES.value)
    runner.check_question_events(ground_truth, prepared.duration, os.path.basename(_VIDEO.value))
    dcfg = runner.make_decode_config(loaded, max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                                     top_p=_TOP_P.value, return_probabilities=bool(_PLOT.value))
    result = runner.run_inference(loaded, prepared, dcfg, seed=_SEED.value)
    for warning in runner.question_warnings(loaded, _QUESTION.value):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if _PLOT.value:
        from d2vlm_jax import visualize
        visualize.write_evidence_plot(_PLOT.value, prepared, result, threshold=dcfg.evidence_threshold,
                                      title=f"{os.path.basename(_VIDEO.value)}: {_QUESTION.value}",
                                      ground_truth=ground_truth)

    if _JSON.value:
        out = result.to_json()
        out.update(video=_VIDEO.value, question=_QUESTION.value, checkpoint=loaded.layout.root,
                   stage=loaded.layout.stage, duration=prepared.duration, plot=_PLOT.value)
        print(json.dumps(out))
        return
    print(f"checkpoint: {loaded.layout.params_dir}")
    print(f"video: {_VIDEO.value} ({prepared.duration:.1f} s, {len(prepared.frame_times)} frames)")
    print(f"question: {_QUESTION.value}")
    print(f"answer: {result.answer}")
    print(f"grounded intervals (s): {runner.describe_grounding(result)}")
    for k, e in enumerate(result.evidence):
        print(f"  <evi> {k + 1} [{e.stage}] frames {e.frames[0]}-{e.frames[1]} = {e.seconds[0]:.1f} - "
              f"{e.seconds[1]:.1f} s")
    if not result.finished:
        print(f"(stopped after --max_new_tokens={_MAX_NEW_TOKENS.value} without <|end|>)")
    if _PLOT.value:
        print(f"plot: {_PLOT.value}")


if __name__ == "__main__":
    cli.run(main)
