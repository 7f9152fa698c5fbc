r"""Interactive demo: ask a D²VLM checkpoint about a video in the browser (Gradio).

  .venv/bin/pip install -e '.[demo]'
  .venv/bin/python launch/demo.py --checkpoint workdir/synthetic     # then open http://127.0.0.1:7860

Pick one of the checkpoint's held-out clips (or upload a video), ask a question, and get the
answer with its timestamps, the evidence plot (launch/infer.py --plot), and the grounded
segments as buttons that seek the video player to their start. --checkpoint takes whatever
launch/infer.py takes (a training workdir, a stage export, an imported release) and is
loaded by the same code (inference/runner.py). The server listens on 127.0.0.1 only.
"""

import html
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from d2vlm_jax import cli  # noqa: E402

HOST = "127.0.0.1"      # never another interface: the demo runs unauthenticated
PLAYER_ID = "d2vlm-player"
_CHECKPOINT = flags.DEFINE_string("checkpoint", "workdir/synthetic", "Checkpoint directory (workdir, stage export "
                                  "or imported), as launch/infer.py takes it.")
_STAGE = flags.DEFINE_string("stage", None, "Stage of a training workdir (default: the last finished one).")
_QFORMER_VOCAB = flags.DEFINE_string("qformer_vocab", None, "Q-Former vocab.txt overriding the checkpoint's.")
_PORT = flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Decode steps per answer.")
_EXAMPLES = flags.DEFINE_integer("examples", 6, "Held-out clips of the checkpoint's eval annotations offered as "
                                 "examples (0: none).")


def example_clips(loaded, limit: int) -> list[list[str]]:
    """``[[video path, question], ...]`` from the checkpoint's eval annotations (if readable)."""
    from d2vlm_jax.data import schema
    path = loaded.data_config.get("eval_annotations") or ""
    if limit <= 0 or not os.path.isfile(path):
        return []
    root = loaded.data_config.get("video_root") or os.path.dirname(os.path.abspath(path))
    out = []
    for sample in schema.load_annotations(path, on_error="skip"):
        video = os.path.join(root, sample.video)
        if os.path.isfile(video) and "<evi>" not in sample.question:
            out.append([video, sample.question])
        if len(out) >= limit:
            break
    return out


def segments_html(result) -> str:
    """The grounded segments as buttons; a click seeks the player to the segment's start."""
    items = [(k, e) for k, e in enumerate(result.evidence)]
    if not items:
        return "<p>No &lt;evi&gt; token in the answer: nothing was grounded.</p>"
    buttons = []
    for k, e in items:
        start, end = e.seconds
        seek = (f"(function(){{var v=document.querySelector('#{PLAYER_ID} video');"
                f"if(v){{v.pause();v.currentTime={start:.3f};}}}})()")
        buttons.append(f'<button class="d2vlm-seek" data-start="{start:.3f}" onclick="{html.escape(seek)}" '
                       f'style="margin:2px;padding:4px 10px;border-radius:6px;border:1px solid #999;'
                       f'cursor:pointer">&lt;evi&gt; {k + 1} ({e.stage}): {start:.1f} - {end:.1f} s</button>')
    return "<div id='d2vlm-segments'><p>Grounded segments (click to seek the video):</p>" + "".join(buttons) + "</div>"


def make_answer_fn(loaded, max_new_tokens: int, plot_dir: str):
    """``(video, question, question_events) -> (answer, segments html, plot png, player video)``."""
    from d2vlm_jax import visualize
    from d2vlm_jax.inference import runner

    dcfg = runner.make_decode_config(loaded, max_new_tokens=max_new_tokens, return_probabilities=True)
    counter = [0]

    def answer(video: str | None, question: str, question_events: str):
        import gradio as gr
        if not video:
            raise gr.Error("Pick an example clip or upload a video first.")
        if not (question or "").strip():
            raise gr.Error("Type a question.")
        try:
            events = runner.parse_question_events(question_events or "")
            prepared = runner.prepare_input(loaded, video, question, question_events=events)
            result = runner.run_inference(loaded, prepared, dcfg)
        except Exception as e:  # noqa: BLE001 - shown in the page, one line
            if isinstance(e, cli.user_error_types() + (ValueError,)):
                raise gr.Error(" ".join(str(e).split())) from None
            raise
        counter[0] += 1
        plot = visualize.write_evidence_plot(os.path.join(plot_dir, f"evidence_{counter[0]}.png"), prepared, result,
                                             title=f"{os.path.basename(video)}: {question}",
                                             threshold=dcfg.evidence_threshold)
        warnings = runner.question_warnings(loaded, question)
        text = (f"**Answer:** {html.escape(result.answer) or '(empty)'}\n\n"
                f"**Grounded (s):** {runner.describe_grounding(result)}"
                + "".join(f"\n\n*warning: {html.escape(w)}*" for w in warnings)
                + ("" if result.finished else f"\n\n*(stopped after {max_new_tokens} tokens without <|end|>)*"))
        return text, segments_html(result), plot, video

    return answer


def build_app(loaded, *, max_new_tokens: int = 64, examples: int = 6, plot_dir: str | None = None):
    """The Gradio Blocks app for ``loaded`` (a ``runner.LoadedCheckpoint``)."""
    import gradio as gr

    plot_dir = plot_dir or tempfile.mkdtemp(prefix="d2vlm_demo_")
    answer = make_answer_fn(loaded, max_new_tokens, plot_dir)
    theme = gr.themes.Default(font=["ui-sans-serif", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="D²VLM demo", analytics_enabled=False, theme=theme) as app:
        gr.Markdown(f"## D²VLM: grounded video question answering\ncheckpoint `{loaded.layout.params_dir}`")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="video (pick an example below or upload)", sources=["upload"],
                                 elem_id="d2vlm-input", height=320)
                question = gr.Textbox(label="question", placeholder="When is the yellow circle visible?",
                                      elem_id="d2vlm-question")
                question_events = gr.Textbox(label="intervals of the question's <evi> tokens (s), e.g. 2-4;6-8",
                                             elem_id="d2vlm-question-events")
                ask = gr.Button("Ask", variant="primary", elem_id="d2vlm-ask")
                clips = example_clips(loaded, examples)
                if clips:
                    gr.Examples(clips, [video, question], label="held-out clips", elem_id="d2vlm-examples")
            with gr.Column():
                player = gr.Video(label="player", interactive=False, elem_id=PLAYER_ID, height=320)
                answer_md = gr.Markdown(elem_id="d2vlm-answer")
                segments = gr.HTML(elem_id="d2vlm-segments-box")
        plot = gr.Image(label="evidence plot", type="filepath", elem_id="d2vlm-plot", interactive=False)
        ask.click(answer, [video, question, question_events], [answer_md, segments, plot, player])
        question.submit(answer, [video, question, question_events], [answer_md, segments, plot, player])
    return app


def main(argv):
    del argv
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    warnings.filterwarnings("ignore", message=".*will be removed in Gradio 6.0.*")
    try:
        import gradio  # noqa: F401
    except ImportError:
        cli.fail("the demo needs Gradio: pip install -e '.[demo]'")
    from d2vlm_jax.inference import runner
    if not os.path.exists(_CHECKPOINT.value):
        cli.fail(f"checkpoint directory {_CHECKPOINT.value} does not exist (train one with launch/train.py, "
                 f"or pass --checkpoint)")
    loaded = runner.load_checkpoint(_CHECKPOINT.value, stage=_STAGE.value, qformer_vocab=_QFORMER_VOCAB.value)
    app = build_app(loaded, max_new_tokens=_MAX_NEW_TOKENS.value, examples=_EXAMPLES.value)
    print(json.dumps({"demo": f"http://{HOST}:{_PORT.value}", "checkpoint": loaded.layout.params_dir}), flush=True)
    app.queue().launch(server_name=HOST, server_port=_PORT.value, share=False, show_api=False,
                       inbrowser=False, quiet=True)


if __name__ == "__main__":
    cli.run(main)
