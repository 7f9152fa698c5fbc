"""Inference from a checkpoint directory: load, prepare one video + question, generate, render.

One loader, :func:`load_checkpoint`, accepts every checkpoint layout the project writes:

* a **training workdir** (``config.json`` written by ``train/loop.py``, stages with
  ``<stage>/export/params``): the params of the last finished stage of ``config.stages``
  (or ``stage=``), the model config from ``<stage>/export/d2vlm_config.json`` when present
  (runs since the export writes it), else rebuilt from ``config.json`` + the tokenizers'
  vocabulary sizes; tokenizers, video sampling and buckets from its data section;
* one stage's **export dir** (``<workdir>/<stage>/export``, or the stage dir itself): as
  above, the workdir's ``config.json`` found two levels up;
* an **imported authors' checkpoint** (``launch/import_checkpoint.py``: ``params/`` +
  ``d2vlm_config.json`` + tokenizer files): data settings are the full-size defaults
  (``pipeline.default_data_config``) with ``tokenizer.json`` and the Q-Former ``vocab.txt``
  of the directory (``qformer_vocab=`` names another one).

Relative paths of a training config (``data/synthetic/tokenizer.json``: relative to where
training ran) are looked up from the current directory, then from the workdir and each of
its parents. Anything missing is a :class:`CheckpointError` naming the file.

Single-example inference (``launch/infer.py``) prepares the prompt exactly as evaluation
does (``template.build_prompt_example`` with ``TemplateConfig(train=False)``: the prefix of
``build_sft_example``), pads it to the data config's buckets, fills the batch up to the
mesh's data-parallel size with padding rows, and runs ``decode.make_generate_fn``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from d2vlm_jax import config as cfg_lib
from d2vlm_jax import sharding
from d2vlm_jax.data import collate as collate_lib
from d2vlm_jax.data import pipeline
from d2vlm_jax.data.template import build_prompt_example
from d2vlm_jax.data.tokenizer import QFormerTokenizer, TextTokenizer
from d2vlm_jax.data.video import decode_video
from d2vlm_jax.inference import decode as decode_lib
from d2vlm_jax.models import stacking
from d2vlm_jax.models.d2vlm import D2VLM, D2VLMConfig

logger = logging.getLogger(__name__)

EXPERIMENT_CONFIG_FILE = "config.json"       # written by train/loop.py in the workdir
MODEL_CONFIG_FILE = "d2vlm_config.json"      # weights/d2vlm_checkpoint.save_model_config
PARAMS_DIR = "params"
DEFAULT_MESH = {"data": -1, "fsdp": 1, "tensor": 1}
_DATA_PATH_FIELDS = ("train_annotations", "eval_annotations", "video_root", "tfds_train_dir", "tfds_eval_dir",
                     "llm_tokenizer", "qformer_vocab")


class CheckpointError(FileNotFoundError):
    """A checkpoint directory that cannot be loaded; the message names what is missing."""


# ----------------------------------------------------------------------------- locating


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """Where the pieces of a checkpoint are (no array read yet).

    kind: ``"workdir"``, ``"export"`` or ``"imported"``.
    params_dir: the Orbax params directory.
    model_config_dir: directory holding ``d2vlm_config.json`` (None: rebuild from the
      experiment config).
    experiment_config: the training run's config (None for an imported checkpoint).
    workdir: the training workdir (None for an imported checkpoint).
    stage: the stage whose export is used (None for an imported checkpoint).
    """
    kind: str
    root: str
    params_dir: str
    model_config_dir: str | None
    experiment_config: ml_collections.ConfigDict | None
    workdir: str | None
    stage: str | None


def _read_experiment_config(directory: str) -> ml_collections.ConfigDict | None:
    path = os.path.join(directory, EXPERIMENT_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable training config ({e})") from None
    if not isinstance(values, dict) or "model" not in values or "data" not in values:
        return None  # e.g. an authors' HF config.json, not a training config
    return ml_collections.ConfigDict(values)


def _has_params(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, PARAMS_DIR))


def locate_checkpoint(directory: str | os.PathLike, stage: str | None = None) -> CheckpointLayout:
    """Finds params, model config and training config of ``directory`` (module docstring)."""
    root = os.path.abspath(os.fspath(directory))
    if not os.path.exists(root):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    if os.path.basename(root) == PARAMS_DIR and os.path.isfile(os.path.join(root, "_CHECKPOINT_METADATA")):
        root = os.path.dirname(root)      # the params directory itself was given

    experiment = _read_experiment_config(root)
    if experiment is not None:            # a training workdir
        stages = [stage] if stage else list(reversed(list(experiment.get("stages", ()))))
        for name in stages:
            export = os.path.join(root, name, "export")
            if _has_params(export):
                return CheckpointLayout("workdir", root, os.path.join(export, PARAMS_DIR),
                                        export if os.path.isfile(os.path.join(export, MODEL_CONFIG_FILE)) else None,
                                        experiment, root, name)
        raise CheckpointError(f"training workdir {directory}: no exported params "
                              + (f"{stage}/export/params" if stage else
                                 f"<stage>/export/params for any of the stages {list(experiment.get('stages', ()))}")
                              + " (is the training finished?)")

    if not _has_params(root) and _has_params(os.path.join(root, "export")):
        root = os.path.join(root, "export")  # a stage directory was given
    if not _has_params(root):
        raise CheckpointError(f"checkpoint directory {directory}: no {PARAMS_DIR}/ (Orbax params) and no training "
                              f"{EXPERIMENT_CONFIG_FILE}; expected a training workdir, <workdir>/<stage>/export, "
                              f"or an imported checkpoint (params/ + {MODEL_CONFIG_FILE} + tokenizer files)")
    has_model_config = os.path.isfile(os.path.join(root, MODEL_CONFIG_FILE))
    if os.path.basename(root) == "export":     # <workdir>/<stage>/export
        workdir = os.path.dirname(os.path.dirname(root))
        experiment = _read_experiment_config(workdir)
        if experiment is not None:
            return CheckpointLayout("export", root, os.path.join(root, PARAMS_DIR),
                                    root if has_model_config else None, experiment, workdir,
                                    os.path.basename(os.path.dirname(root)))
    if not has_model_config:
        raise CheckpointError(f"checkpoint directory {directory}: has {PARAMS_DIR}/ but no {MODEL_CONFIG_FILE} "
                              f"(and no training {EXPERIMENT_CONFIG_FILE} two levels up)")
    return CheckpointLayout("imported", root, os.path.join(root, PARAMS_DIR), root, None, None, None)


def _resolve_path(path: str, base_dirs: Sequence[str]) -> str:
    """``path`` as given when it exists (absolute or from the current directory), else the
    first ``base/path`` that exists for ``base`` in ``base_dirs`` and their parents; the
    input unchanged when none does (the consumer then reports it)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    for base in base_dirs:
        d = os.path.abspath(base)
        while True:
            candidate = os.path.join(d, path)
            if os.path.exists(candidate):
                return candidate
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
    return path


def data_config_for(layout: CheckpointLayout, qformer_vocab: str | None = None) -> ml_collections.ConfigDict:
    """The data config inference uses: the training run's (paths resolved) or, for an
    imported checkpoint, the defaults with the directory's tokenizer files."""
    if layout.experiment_config is not None:
        data = ml_collections.ConfigDict(layout.experiment_config.data.to_dict())
        for field in _DATA_PATH_FIELDS:
            if data.get(field):
                data[field] = _resolve_path(data[field], [layout.workdir])
    else:
        data = pipeline.default_data_config()
        data.llm_tokenizer = os.path.join(layout.root, "tokenizer.json")
        data.qformer_vocab = os.path.join(layout.root, "vocab.txt")
    if qformer_vocab:
        data.qformer_vocab = qformer_vocab
    for field, what in (("llm_tokenizer", "LLM tokenizer (tokenizer.json)"),
                        ("qformer_vocab", "Q-Former WordPiece vocabulary (vocab.txt)")):
        if not os.path.isfile(data[field]):
            hint = (" (pass qformer_vocab= / --qformer_vocab)" if field == "qformer_vocab" else "")
            raise CheckpointError(f"checkpoint {layout.root}: {what} not found at {data[field]}{hint}")
    return data


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedCheckpoint:
    """A model ready for generation.

    params: the ``params`` tree placed on ``mesh`` with the model's sharding rules.
    data_config: tokenizer files, video sampling, template and buckets (``config.data``).
    """
    layout: CheckpointLayout
    model_config: D2VLMConfig
    model: D2VLM
    params: Any
    data_config: ml_collections.ConfigDict
    tokenizer: TextTokenizer
    qformer_tokenizer: QFormerTokenizer
    mesh: jax.sharding.Mesh

    @property
    def tokenizers(self) -> tuple[TextTokenizer, QFormerTokenizer]:
        return self.tokenizer, self.qformer_tokenizer

    @property
    def data_parallel_size(self) -> int:
        """Rows a global batch must be a multiple of (mesh ``data * fsdp``)."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])


def _model_config(layout: CheckpointLayout, tokenizers) -> D2VLMConfig:
    from d2vlm_jax.weights.d2vlm_checkpoint import load_model_config
    if layout.model_config_dir is not None:
        config = load_model_config(layout.model_config_dir)
        rules = sharding.rules_from_config(layout.experiment_config.get("sharding_rules")
                                           if layout.experiment_config is not None else None)
        return dataclasses.replace(config, llm=dataclasses.replace(config.llm, sharding_rules=rules))
    return cfg_lib.model_config(layout.experiment_config, vocab_size=tokenizers[0].vocab_size,
                                qformer_vocab_size=tokenizers[1].vocab_size)


def stored_shapes(params_dir: str, stacks: Sequence[stacking.LayerStack] = ()) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` of an Orbax params checkpoint, from its metadata (nothing read),
    in the layer layout ``stacks`` ask for (the checkpoint's own when none are given)."""
    import orbax.checkpoint as ocp

    from d2vlm_jax.train.checkpoint import stored_tree

    if not os.path.isdir(params_dir):
        raise CheckpointError(f"no params checkpoint at {params_dir}")
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
    flat = traverse_util.flatten_dict(stored_tree(metadata), sep="/")
    shapes = traverse_util.unflatten_dict({k: tuple(v.shape) for k, v in flat.items()}, sep="/")
    return traverse_util.flatten_dict(stacking.to_layout(shapes, stacks), sep="/")


def check_params_fit(shapes: Mapping[str, tuple[int, ...]], abstract: Mapping, where: str) -> None:
    """Every leaf of the model must be in the checkpoint with its shape, and nothing else.
    ``shapes``: ``{"a/b/c": shape}`` (:func:`stored_shapes`); ``abstract``: the params tree."""
    want = traverse_util.flatten_dict(dict(abstract), sep="/")
    got = dict(shapes)
    problems = [f"missing parameter {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected parameter {k}" for k in sorted(set(got) - set(want))]
    problems += [f"shape mismatch for {k}: checkpoint {tuple(got[k])} vs model {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(got)) if tuple(got[k]) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(f"params at {where} do not fit the model config ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))


def load_checkpoint(directory: str | os.PathLike, *, stage: str | None = None,
                    mesh_sizes: Mapping[str, int] | None = None, qformer_vocab: str | None = None
                    ) -> LoadedCheckpoint:
    """Loads any checkpoint layout of the module docstring onto a mesh.

    Args:
      directory: training workdir, stage export dir, or imported checkpoint.
      stage: which stage of a workdir (default: the last finished one of ``config.stages``).
      mesh_sizes: ``{data, fsdp, tensor}`` (default: the training config's ``mesh``, else all
        devices on ``data``).
      qformer_vocab: Q-Former ``vocab.txt`` overriding the checkpoint's.
    Raises:
      CheckpointError: naming the missing directory, file or the parameters that do not fit.
    """
    from d2vlm_jax.train import checkpoint as ckpt_lib
    from d2vlm_jax.train.loop import abstract_boxed_variables

    layout = locate_checkpoint(directory, stage)
    data = data_config_for(layout, qformer_vocab)
    tokenizers = pipeline.load_tokenizers(data)
    model_config = _model_config(layout, tokenizers)
    if model_config.llm.vocab_size < tokenizers[0].vocab_size:
        raise CheckpointError(f"{layout.root}: the LLM tokenizer {data.llm_tokenizer} has {tokenizers[0].vocab_size} "
                              f"ids but the model only {model_config.llm.vocab_size} embedding rows")
    if mesh_sizes is None:
        mesh_sizes = (dict(layout.experiment_config.mesh) if layout.experiment_config is not None
                      else dict(DEFAULT_MESH))
    mesh = sharding.make_mesh(dict(mesh_sizes))
    boxed = abstract_boxed_variables(model_config)
    param_shardings = sharding.shardings_for(boxed, mesh, model_config.llm.sharding_rules)["params"]
    abstract = sharding.unbox(boxed)["params"]
    stacks = model_config.layer_stacks  # a checkpoint of the other layer layout is converted
    check_params_fit(stored_shapes(layout.params_dir, stacks), abstract, layout.params_dir)
    # restored straight onto the mesh (every process reads its own shards)
    params = ckpt_lib.load_params(layout.params_dir, ckpt_lib.abstract_like(abstract, param_shardings), stacks=stacks)
    logger.info("loaded %s checkpoint %s (%s)", layout.kind, layout.params_dir, f"stage {layout.stage}"
                if layout.stage else "imported")
    return LoadedCheckpoint(layout, model_config, D2VLM(model_config), params, data, tokenizers[0], tokenizers[1],
                            mesh)


# ----------------------------------------------------------------------------- one example


@dataclasses.dataclass
class PreparedInput:
    """One video + question as a model batch.

    batch: host batch (prefix fields of ``d2vlm_jax.batch`` + ``example_id``/``frame_times``)
      with ``rows`` rows: row 0 is the example, the rest padding rows (mesh data size).
    frames: uint8[N, S, S, 3] the sampled frames (N = real frames, unpadded).
    frame_times: float32[N] seconds of each frame.
    duration: the video's duration in seconds.
    """
    batch: dict[str, np.ndarray]
    frames: np.ndarray
    frame_times: np.ndarray
    duration: float


def _buckets_fitting(data: ml_collections.ConfigDict, example: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """The data config's buckets, each dimension extended by the example's own size when it
    exceeds the largest bucket (one video on its own needs no shared shapes)."""
    buckets = {k: sorted(int(s) for s in v) for k, v in data.buckets.to_dict().items()}
    for dim, size in collate_lib.natural_sizes(example).items():
        if dim in buckets and size > buckets[dim][-1]:
            buckets[dim].append(int(size))
    return buckets


def prepare_input(loaded: LoadedCheckpoint, video_path: str, question: str, *,
                  question_events: Sequence[tuple[float, float]] = (), fps: float | None = None,
                  max_frames: int | None = None) -> PreparedInput:
    """Decodes ``video_path`` (the data config's sampling; ``fps`` / ``max_frames`` override;
    no duration limits) and builds the evaluation prompt for ``question``; a question with
    ``<evi>`` tokens needs one ``(start, end)`` seconds interval each in ``question_events``.

    Raises ``VideoError`` subclasses (naming the path) for a missing or unreadable video and
    ``template.ExampleError`` for a question that cannot be tokenized or is too long."""
    data = ml_collections.ConfigDict(loaded.data_config.to_dict())
    if fps is not None:
        data.fps = float(fps)
    if max_frames is not None:
        data.max_frames = int(max_frames)
    settings = pipeline.decode_settings(data)
    video = decode_video(video_path, fps=settings.fps, max_frames=settings.max_frames, min_duration=0.0,
                         max_duration=None, image_size=settings.image_size, decode_threads=settings.decode_threads)
    check_question_events(question_events, float(video.duration), os.path.basename(video_path))
    template = pipeline.template_config(data, loaded.tokenizer, train=False)
    example = build_prompt_example({"video": os.path.basename(video_path), "task": "infer", "question": question,
                                    "question_events": [tuple(map(float, e)) for e in question_events]},
                                   frame_times=video.frame_times, tokenizer=loaded.tokenizer,
                                   qformer_tokenizer=loaded.qformer_tokenizer, config=template)
    example["frames"] = video.frames
    batch = collate_lib.collate([example], _buckets_fitting(data, example))
    batch = collate_lib.pad_batch(batch, loaded.data_parallel_size)
    return PreparedInput(batch, video.frames, np.asarray(video.frame_times, np.float32), float(video.duration))


def parse_question_events(text: str) -> list[tuple[float, float]]:
    """``"2-4.5;7-9"`` -> ``[(2.0, 4.5), (7.0, 9.0)]`` (seconds); ValueError names the part."""
    events = []
    for part in text.split(";"):
        if not part.strip():
            continue
        bounds = part.split("-")
        try:
            if len(bounds) != 2:
                raise ValueError
            events.append((float(bounds[0]), float(bounds[1])))
        except ValueError:
            raise ValueError(f"question events {text!r}: {part.strip()!r} is not 'start-end' in seconds "
                             f"(e.g. '2-4.5;7-9')") from None
    return events


def check_question_events(events: Sequence[tuple[float, float]], duration: float, video: str) -> None:
    """Every interval must satisfy ``0 <= start <= end <= duration`` (seconds); raises
    :class:`~d2vlm_jax.data.template.ExampleError` naming the interval and the duration."""
    from d2vlm_jax.data.template import ExampleError
    for k, (start, end) in enumerate(events):
        if not 0.0 <= start <= end <= duration + 1e-6:
            raise ExampleError(f"video {video!r}", "question_events",
                               f"interval {k + 1} = {start:g}-{end:g} s is outside the video (0-{duration:.1f} s) "
                               f"or reversed; give 'start-end' seconds within it")


@dataclasses.dataclass
class Evidence:
    """One generated ``<evi>``: its frame interval, seconds, stage and grounding curve."""
    frames: tuple[int, int]
    seconds: tuple[float, float]
    stage: str                     # "grounding" (before </evi>) or "answer"
    probs: np.ndarray | None       # float32[N] p_t over the real frames


@dataclasses.dataclass
class InferenceResult:
    """SPEC §5.4 output of one question.

    answer: text after ``</evi>`` with every ``<evi>`` rendered as ``"{start} - {end}"`` s.
    grounding_seconds: intervals of the grounding-stage ``<evi>`` tokens.
    raw_text: the whole generated text with special tokens (for debugging).
    """
    answer: str
    grounding_seconds: list[tuple[float, float]]
    evidence: list[Evidence]
    raw_text: str
    token_ids: list[int]
    finished: bool
    frame_times: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "grounding_seconds": [list(s) for s in self.grounding_seconds],
                "evidence": [{"frames": list(e.frames), "seconds": list(e.seconds), "stage": e.stage,
                              "probs": None if e.probs is None else [round(float(p), 4) for p in e.probs]}
                             for e in self.evidence],
                "raw_text": self.raw_text, "finished": self.finished,
                "frame_times": [float(t) for t in self.frame_times]}


def unknown_characters(tokenizer: TextTokenizer, text: str) -> list[str]:
    """The characters of ``text`` the tokenizer has no piece for (it encodes them byte by
    byte, ``<0xXX>`` pieces): text a model may never have seen in training."""
    unknown = []
    for char in dict.fromkeys(text):
        if char.isspace():
            continue
        pieces = [tokenizer._tokenizer.id_to_token(i) for i in tokenizer.encode(char)]
        if any(p and p.startswith("<0x") and p.endswith(">") and len(p) == 6 for p in pieces):
            unknown.append(char)
    return unknown


def question_warnings(loaded: LoadedCheckpoint, question: str) -> list[str]:
    """Reasons to distrust an answer that come from the question itself."""
    unknown = unknown_characters(loaded.tokenizer, question)
    if not unknown:
        return []
    shown = "".join(unknown[:12]) + ("..." if len(unknown) > 12 else "")
    return [f"{len(unknown)} character(s) of the question are not in the tokenizer's vocabulary ({shown!r}) and "
            f"are encoded byte by byte: text unlike the training questions, so the answer and its grounding are "
            f"unreliable"]


def describe_grounding(result: "InferenceResult") -> str:
    """The grounding-stage intervals in seconds, or why there are none."""
    if result.grounding_seconds:
        return ", ".join(f"{s:.1f} - {e:.1f}" for s, e in result.grounding_seconds)
    answer_evi = [e for e in result.evidence if e.stage == "answer"]
    if answer_evi:
        return (f"none (the model skipped the grounding stage: no <evi> before </evi>; the {len(answer_evi)} "
                f"<evi> of the answer are listed below)")
    return "none (the answer has no <evi> token)"


def make_decode_config(loaded: LoadedCheckpoint, *, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, return_probabilities: bool = False) -> decode_lib.DecodeConfig:
    tok = loaded.tokenizer
    return decode_lib.DecodeConfig(max_new_tokens=max_new_tokens, evi_token_id=tok.evi_id, end_token_id=tok.end_id,
                                   pad_token_id=tok.pad_id, temperature=temperature, top_p=top_p,
                                   return_probabilities=return_probabilities)


def run_inference(loaded: LoadedCheckpoint, prepared: PreparedInput, config: decode_lib.DecodeConfig,
                  seed: int = 0) -> InferenceResult:
    """Generates for row 0 of ``prepared`` and renders it."""
    tok = loaded.tokenizer
    generate = decode_lib.make_generate_fn(loaded.model, config)
    with jax.set_mesh(loaded.mesh):
        dev = sharding.host_batch_to_global({k: prepared.batch[k] for k in decode_lib.PREFIX_KEYS}, loaded.mesh,
                                            loaded.model_config.llm.sharding_rules)
        rng = None if config.greedy else jax.random.key(seed)
        row = decode_lib.unbatch(generate({"params": loaded.params}, dev, rng), tok.evi_id)[0]
    n = prepared.frame_times.shape[0]
    answer, grounding = decode_lib.render_answer(
        row.token_ids, row.evidence_intervals, lambda t: tok.decode(t), prepared.frame_times,
        evi_token_id=tok.evi_id, evi_end_token_id=tok.evi_end_id, stop_token_ids=(tok.end_id, tok.pad_id))
    evi_at = [k for k, t in enumerate(row.token_ids) if t == tok.evi_id]
    end_at = [k for k, t in enumerate(row.token_ids) if t == tok.evi_end_id]
    evidence = []
    for j, (k, (first, last)) in enumerate(zip(evi_at, row.evidence_intervals)):
        probs = None if row.evidence_probs is None else np.asarray(row.evidence_probs[j][:n], np.float32)
        evidence.append(Evidence((first, last), (float(prepared.frame_times[first]), float(prepared.frame_times[last])),
                                 "grounding" if end_at and k < end_at[0] else "answer", probs))
    return InferenceResult(answer, grounding, evidence, tok.decode(row.token_ids), row.token_ids, row.finished,
                           prepared.frame_times)


__all__ = ["CheckpointError", "CheckpointLayout", "LoadedCheckpoint", "PreparedInput", "InferenceResult", "Evidence",
           "locate_checkpoint", "data_config_for", "load_checkpoint", "stored_shapes", "check_params_fit", "prepare_input",
           "parse_question_events", "check_question_events", "unknown_characters", "question_warnings",
           "describe_grounding",
           "make_decode_config", "run_inference"]
