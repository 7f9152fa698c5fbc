"""The Grain input pipeline: annotations + videos -> padded host batches (``d2vlm_jax.batch``).

Training (:func:`make_train_iterator`)::

    MapDataset.source(records)                  # (index, Sample) from the annotation file, or
                                                # tfds ArrayRecord records (tfds_builder.py)
      [process_index::process_count]            # fixed per-process shard: disjoint, covering
      .seed(seed).shuffle()                     # index shuffle, a new order every epoch
      .repeat(num_epochs)                       # None: forever
      .map_with_index(tag epoch)                # epoch -> template seed (<image> placement)
      .map(LoadExample)                         # decode + resize frames, build the SFT or
                                                # preference example, pad it to its buckets;
                                                # a bad sample becomes a SkippedRecord
      .to_iter_dataset(ReadOptions)             # threads in this process
      .mp_prefetch(workers)                     # optional worker processes
      .filter(SkipCounter)                      # main process: counts + logs every skip
      .batch(batch_size_per_host, drop_remainder=True, batch_fn=Collate)
    -> DataIterator (a grain DatasetIterator: get_state / set_state, ``.stats``)

Bad data never stops a run: a missing, empty, corrupt, too short or too long video, an
example the template rejects (over-long sequence, inconsistent ``<evi>``), or one that does
not fit the largest bucket is logged with its file and reason and counted in
:class:`PipelineStats`. The skip markers travel through the worker processes and are counted
in the main process, so the counts are exact with any number of workers (they restart at 0
when an iterator is restored from a checkpoint). If every sample of this process's shard
turns out bad, :class:`DataError` says so (with the counts and the last reasons) instead of
looping forever.

Static shapes: every dimension of a batch is padded to a bucket size (``data.buckets``).
With ``shape_policy="bucket"`` a batch takes the smallest bucket holding its largest
example (a few compiled programs); ``"max"`` pads every batch to the largest buckets (one
program; required with several processes, whose batches must have the same shape for
``jax.make_array_from_process_local_data``); ``"auto"`` picks ``"bucket"`` for one process and
``"max"`` otherwise.

Checkpointing (Orbax ``CheckpointManager``)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iterator)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iterator)))   # restores in place

``data_iterator`` must be built with the same config, seed, batch size and process layout;
each process writes ``process_{i}-of-{n}.json``. The state is the position of the stream
(a JSON dict), so the restored iterator yields exactly the batches the saved one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
from absl import flags
import numpy as np

from d2vlm_jax.data import collate as collate_lib
from d2vlm_jax.data import schema
from d2vlm_jax.data.template import ExampleError, TemplateConfig, build_preference_example, build_sft_example
from d2vlm_jax.data.tokenizer import IMAGE_TOKEN, QFormerTokenizer, TextTokenizer, TokenizerError
from d2vlm_jax.data.video import (CorruptVideoError, EmptyVideoError, VideoError, VideoNotFoundError,
                                  VideoTooLongError, VideoTooShortError, decode_video)

logger = logging.getLogger(__name__)

STAGES = ("sft", "fpo")
SHAPE_POLICIES = ("auto", "bucket", "max")
SOURCES = ("videos", "tfds")

#: Skip reasons counted in :class:`PipelineStats` (``PipelineStats.skipped`` keys).
SKIP_REASONS = ("video_not_found", "empty_video", "corrupt_video", "video_too_short", "video_too_long",
                "video_error", "frames_error", "example_error", "bucket_overflow")


class DataError(RuntimeError):
    """The pipeline cannot produce data (bad config, no valid sample at all)."""


class FramesError(ValueError):
    """Stored (pre-packaged) frames that cannot be decoded or do not match the config."""


# ---------------------------------------------------------------------------- config


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of an experiment config (``config.data``), full-size defaults.

    Fields:
      train_annotations, eval_annotations: annotation JSON files (SPEC §2.3; FPO stage: the
        preference file written by ``launch/make_preferences.py``).
      video_root: directory the samples' ``video`` paths are relative to ("" = the directory of
        the annotation file).
      source: ``"videos"`` (decode mp4 files) or ``"tfds"`` (pre-packaged frames,
        ``tfds_builder.py``); ``tfds_train_dir`` / ``tfds_eval_dir``: the built dataset
        directories (``.../d2vlm_packaged/<config>/<version>``).
      llm_tokenizer, qformer_vocab: tokenizer files (:func:`load_tokenizers`);
        qformer_max_length: Q-Former text length (256); prefix_space: TextTokenizer option.
      fps, max_frames, min_duration, max_duration, image_size, decode_threads: video
        sampling (``video.decode_video``); SPEC: 1 fps, videos 5-350 s, 224 px.
      image_token_id: placeholder id of frame slots (-1: the tokenizer's ``<image>`` id, else
        its pad id). The model overwrites these embeddings, so any id works.
      template: ``TemplateConfig`` fields (max_length, image_first_probability, system_prompt,
        add_bos, grounding_separator, answer_separator).
      buckets: allowed padded sizes per dimension (N, L, P, R, M, K, Q, C; ``collate.py``).
      shape_policy: ``"auto" | "bucket" | "max"`` (module docstring).
      num_epochs: training epochs (None: repeat forever); shuffle: shuffle training data.
      workers: Grain worker processes (0: decode in this process's threads);
        worker_buffer_size: examples buffered per worker; read_threads, read_buffer_size:
        decoding threads (per process / worker) and examples they buffer ahead.
      on_annotation_error: ``"skip"`` (log + count invalid annotations) or ``"raise"``.
    """
    c = ml_collections.ConfigDict()
    c.train_annotations = ""
    c.eval_annotations = ""
    c.video_root = ""
    c.source = "videos"
    c.tfds_train_dir = ""
    c.tfds_eval_dir = ""
    c.llm_tokenizer = ""
    c.qformer_vocab = ""
    c.qformer_max_length = 256
    c.prefix_space = ml_collections.config_dict.placeholder(str)
    c.fps = 1.0
    c.max_frames = 350
    c.min_duration = 5.0
    c.max_duration = 350.0
    c.image_size = 224
    c.decode_threads = 1
    c.image_token_id = -1
    c.template = ml_collections.ConfigDict(dict(
        max_length=2048, image_first_probability=0.5, system_prompt=TemplateConfig.system_prompt,
        add_bos=True, grounding_separator=", ", answer_separator=" "))
    c.buckets = ml_collections.ConfigDict(dict(
        N=[64, 128, 256, 350], L=[64, 128, 256], P=[256, 512, 1024, 2048], R=[128, 256, 512, 1024],
        M=[8, 16, 32, 64], K=[4, 8, 16, 32], Q=[1, 4, 8], C=[1, 2, 4]))
    c.shape_policy = "auto"
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.shuffle = True
    c.workers = 0
    c.worker_buffer_size = 2
    c.read_threads = 4
    c.read_buffer_size = 16
    c.on_annotation_error = "skip"
    return c


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Video sampling settings (arguments of ``decode_video``)."""
    fps: float
    max_frames: int
    min_duration: float
    max_duration: float | None
    image_size: int
    decode_threads: int = 1


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise DataError(f"config field data.{field}: {message}")


def decode_settings(data_config: ml_collections.ConfigDict) -> DecodeSettings:
    """``data_config`` -> :class:`DecodeSettings`, validated (errors name the field)."""
    c = data_config
    _require(c.fps > 0, "fps", f"must be > 0, got {c.fps}")
    _require(c.max_frames >= 1, "max_frames", f"must be >= 1, got {c.max_frames}")
    _require(c.image_size >= 1, "image_size", f"must be >= 1, got {c.image_size}")
    _require(c.min_duration >= 0, "min_duration", f"must be >= 0, got {c.min_duration}")
    _require(c.max_duration is None or c.max_duration >= c.min_duration, "max_duration",
             f"must be >= min_duration {c.min_duration}, got {c.max_duration}")
    return DecodeSettings(fps=float(c.fps), max_frames=int(c.max_frames), min_duration=float(c.min_duration),
                          max_duration=None if c.max_duration is None else float(c.max_duration),
                          image_size=int(c.image_size), decode_threads=int(c.decode_threads))


def buckets_from_config(data_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """``data.buckets`` -> ``{dim: sorted sizes}``; every dimension of ``collate.DIM_NAMES``."""
    raw = data_config.buckets.to_dict() if hasattr(data_config.buckets, "to_dict") else dict(data_config.buckets)
    unknown = sorted(set(raw) - set(collate_lib.DIM_NAMES))
    _require(not unknown, "buckets", f"unknown dimension(s) {unknown}; known {collate_lib.DIM_NAMES}")
    out = {}
    for dim in collate_lib.DIM_NAMES:
        sizes = raw.get(dim)
        _require(bool(sizes) and all(int(s) >= 1 for s in sizes), f"buckets.{dim}",
                 f"needs a non-empty list of positive sizes, got {sizes!r}")
        out[dim] = tuple(sorted(int(s) for s in sizes))
    _require(out["N"][-1] >= data_config.max_frames, "buckets.N",
             f"largest frame bucket {out['N'][-1]} is below max_frames {data_config.max_frames}")
    return out


def template_config(data_config: ml_collections.ConfigDict, tokenizer: TextTokenizer, *, train: bool
                    ) -> TemplateConfig:
    """``data.template`` + ``data.image_token_id`` -> :class:`TemplateConfig`."""
    fields = data_config.template.to_dict()
    known = {f.name for f in dataclasses.fields(TemplateConfig)} - {"image_token_id", "train"}
    unknown = sorted(set(fields) - known)
    _require(not unknown, "template", f"unknown field(s) {unknown}; known {sorted(known)}")
    return TemplateConfig(image_token_id=resolve_image_token_id(data_config, tokenizer), train=train, **fields)


def resolve_image_token_id(data_config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> int:
    """``data.image_token_id``, or (-1) the tokenizer's ``<image>`` id, else its pad id."""
    if data_config.image_token_id >= 0:
        return int(data_config.image_token_id)
    try:
        return tokenizer.token_id(IMAGE_TOKEN)
    except TokenizerError:
        return tokenizer.pad_id


def load_tokenizers(data_config: ml_collections.ConfigDict) -> tuple[TextTokenizer, QFormerTokenizer]:
    """The LLM tokenizer and the Q-Former tokenizer named by ``data.llm_tokenizer`` /
    ``data.qformer_vocab``."""
    _require(bool(data_config.llm_tokenizer), "llm_tokenizer", "no tokenizer file given")
    _require(bool(data_config.qformer_vocab), "qformer_vocab", "no Q-Former vocab.txt given")
    return (TextTokenizer(data_config.llm_tokenizer, prefix_space=data_config.prefix_space),
            QFormerTokenizer(data_config.qformer_vocab, max_length=data_config.qformer_max_length))


# ---------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One element of the source: the annotation's index in its file and the sample; for the
    tfds source also the stored frames (``encoded_frames``, ``frame_encoding``, ``frame_times``)."""
    index: int
    sample: schema.Sample
    encoded_frames: tuple[bytes, ...] | None = None
    frame_encoding: str | None = None
    frame_times: np.ndarray | None = None
    frame_size: int | None = None


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """What a bad sample becomes (counted and dropped by :class:`SkipCounter`)."""
    index: int
    video: str
    reason: str      # one of SKIP_REASONS
    message: str


class AnnotationSource:
    """Random-access source of :class:`SourceRecord` over validated samples (picklable)."""

    def __init__(self, samples: Sequence[schema.Sample], indices: Sequence[int] | None = None):
        self._samples = list(samples)
        self._indices = list(range(len(self._samples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> SourceRecord:
        return SourceRecord(index=self._indices[i], sample=self._samples[i])


def read_annotations(path: str, *, on_error: str = "skip") -> tuple[list[schema.Sample], list[int],
                                                                     schema.ValidationReport]:
    """Validated samples of an annotation file with their indices in the file (skipped
    invalid samples leave gaps, so ``example_id`` always points into the file)."""
    report = schema.ValidationReport()
    samples, indices = schema.load_annotations_with_indices(path, on_error=on_error, report=report)
    return samples, indices, report


# ---------------------------------------------------------------------------- transforms


_VIDEO_REASONS = ((VideoNotFoundError, "video_not_found"), (EmptyVideoError, "empty_video"),
                  (CorruptVideoError, "corrupt_video"), (VideoTooShortError, "video_too_short"),
                  (VideoTooLongError, "video_too_long"), (VideoError, "video_error"))


def _video_reason(error: VideoError) -> str:
    return next(reason for cls, reason in _VIDEO_REASONS if isinstance(error, cls))


class TagEpoch:
    """``map_with_index``: ``(i, record) -> (epoch, record)`` with ``epoch = i // epoch_length``."""

    def __init__(self, epoch_length: int):
        self.epoch_length = max(1, int(epoch_length))

    def __call__(self, index: int, record: SourceRecord) -> tuple[int, SourceRecord]:
        return index // self.epoch_length, record


class LoadExample:
    """``(epoch, SourceRecord) -> padded example dict`` or :class:`SkippedRecord`.

    Decodes the frames (video file or tfds bytes), builds the SFT or preference example,
    adds ``frames uint8[N, S, S, 3]`` and pads every dimension to its smallest bucket. Module
    level and picklable (tokenizers included) so Grain worker processes can run it.
    """

    def __init__(self, *, stage: str, video_root: str, decode: DecodeSettings, tokenizer: TextTokenizer,
                 qformer_tokenizer: QFormerTokenizer, template: TemplateConfig, buckets: Mapping[str, Sequence[int]],
                 seed: int):
        if stage not in STAGES:
            raise DataError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.video_root = video_root
        self.decode = decode
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.template = template
        self.buckets = {k: tuple(v) for k, v in buckets.items()}
        self.seed = int(seed)

    def _frames(self, record: SourceRecord) -> tuple[np.ndarray, np.ndarray]:
        if record.encoded_frames is None:
            video = decode_video(os.path.join(self.video_root, record.sample.video), fps=self.decode.fps,
                                 max_frames=self.decode.max_frames, min_duration=self.decode.min_duration,
                                 max_duration=self.decode.max_duration, image_size=self.decode.image_size,
                                 decode_threads=self.decode.decode_threads)
            return video.frames, video.frame_times
        from d2vlm_jax.data import tfds_builder  # only the tfds source needs it
        frames = tfds_builder.decode_frames(record.encoded_frames, record.frame_encoding, record.frame_size)
        if frames.shape[1] != self.decode.image_size:
            raise FramesError(f"stored frames are {frames.shape[1]} px but data.image_size is "
                              f"{self.decode.image_size}: rebuild the tfds dataset")
        return frames, np.asarray(record.frame_times, np.float32)

    def __call__(self, element: tuple[int, SourceRecord]) -> dict[str, np.ndarray] | SkippedRecord:
        epoch, record = element
        sample = record.sample

        def skipped(reason: str, error: Exception) -> SkippedRecord:
            return SkippedRecord(index=record.index, video=sample.video, reason=reason, message=str(error))

        try:
            frames, frame_times = self._frames(record)
        except VideoError as e:
            return skipped(_video_reason(e), e)
        except (OSError, FramesError) as e:  # unreadable file, undecodable stored frames
            return skipped("frames_error", e)
        build = build_sft_example if self.stage == "sft" else build_preference_example
        try:
            example = build(sample, frame_times=frame_times, tokenizer=self.tokenizer,
                            qformer_tokenizer=self.qformer_tokenizer, config=self.template,
                            rng_seed=self.seed * 100_003 + int(epoch), example_index=record.index)
        except ExampleError as e:
            return skipped("example_error", e)
        example["frames"] = frames
        try:
            return collate_lib.pad_example(example, self.buckets)
        except collate_lib.PaddingError as e:
            return skipped("bucket_overflow", e)


@dataclasses.dataclass
class PipelineStats:
    """Counters of one iterator (main process; exact with any number of workers).

    Attributes:
      examples: examples that reached batching.
      skipped: skipped samples per reason (:data:`SKIP_REASONS`).
      annotations_skipped: invalid annotations dropped when the file was read.
      last_skips: the most recent skip messages (at most 20).
      skipped_indices: the annotation-file index of every skipped sample, in order.
    """
    examples: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    annotations_skipped: int = 0
    last_skips: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=20))
    skipped_indices: list = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.examples} examples, {self.num_skipped} skipped ({reasons}), "
                f"{self.annotations_skipped} invalid annotations")


class SkipCounter:
    """The main-process filter: drops :class:`SkippedRecord` elements, logs and counts them,
    and raises :class:`DataError` once every record of the shard has failed with no success.
    The first :attr:`CONSOLE_WARNINGS` skips are warnings, the rest INFO (the log file)."""

    CONSOLE_WARNINGS = 5

    def __init__(self, stats: PipelineStats, shard_size: int, where: str):
        self.stats = stats
        self.shard_size = shard_size
        self.where = where
        self._failed_indices: set[int] | None = set()   # None once any example succeeded

    def __call__(self, element: Any) -> bool:
        if not isinstance(element, SkippedRecord):
            self.stats.examples += 1
            self._failed_indices = None
            return True
        self.stats.skipped[element.reason] += 1
        self.stats.skipped_indices.append(element.index)
        line = f"skipped sample {element.index} (video {element.video!r}): {element.reason}: {element.message}"
        self.stats.last_skips.append(line)
        if self.stats.num_skipped <= self.CONSOLE_WARNINGS:
            logger.warning("%s%s", line, "; further skips are counted and logged at INFO level"
                           if self.stats.num_skipped == self.CONSOLE_WARNINGS else "")
        else:
            logger.info("%s", line)
        if self._failed_indices is not None:
            self._failed_indices.add(element.index)
            if len(self._failed_indices) >= self.shard_size:
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.skipped.items()))
                hint = (" Check data.video_root (the videos' directory; default: the annotation file's) and the "
                        "files' 'video' paths." if "video_not_found" in self.stats.skipped else "")
                raise DataError(f"every one of the {self.shard_size} samples of {self.where} failed ({reasons}); "
                                f"last: {line}.{hint}")
        return False


class Collate:
    """``batch_fn``: stacks padded examples; ``pad_to`` rows (eval) with padding rows.

    ``max_shapes``: pad every dimension to its largest bucket (shape policy ``"max"``)."""

    def __init__(self, buckets: Mapping[str, Sequence[int]], *, max_shapes: bool, pad_to: int | None = None):
        self.buckets = ({k: (max(v),) for k, v in buckets.items()} if max_shapes
                        else {k: tuple(v) for k, v in buckets.items()})
        self.pad_to = pad_to

    def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = collate_lib.collate(examples, self.buckets)
        if self.pad_to is not None:
            batch = collate_lib.pad_batch(batch, self.pad_to)
        return batch


# ---------------------------------------------------------------------------- iterators


class DataIterator(grain.DatasetIterator):
    """The training iterator: host batches (dicts of numpy arrays, ``d2vlm_jax.batch``).

    A ``grain.DatasetIterator`` (``get_state`` / ``set_state``), so it goes straight into
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``. ``stats`` counts examples and
    skips of this process; ``close()`` stops worker processes.
    """

    def __init__(self, iterator: grain.DatasetIterator, stats: PipelineStats):
        super().__init__(iterator)
        self._iterator = iterator
        self.stats = stats

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        self._iterator.close()
        super().close()


@dataclasses.dataclass(frozen=True)
class _Plan:
    source: Any
    shard_size: int
    total_size: int
    video_root: str
    annotations_skipped: int
    where: str


def _plan(data_config: ml_collections.ConfigDict, *, split: str, process_index: int, process_count: int) -> _Plan:
    """Reads the annotation file (or opens the tfds dataset) and cuts this process's shard."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, process_count={process_count})")
    _require(data_config.source in SOURCES, "source", f"must be one of {SOURCES}, got {data_config.source!r}")
    if data_config.source == "tfds":
        from d2vlm_jax.data import tfds_builder
        directory = data_config.get(f"tfds_{split}_dir")
        _require(bool(directory), f"tfds_{split}_dir", "no built tfds dataset directory given")
        source = tfds_builder.PackagedSource(directory, split="train" if split == "train" else "eval")
        total, video_root, skipped, where = len(source), "", 0, directory
    else:
        path = data_config.get(f"{split}_annotations")
        _require(bool(path), f"{split}_annotations", "no annotation file given")
        _require(os.path.isfile(path), f"{split}_annotations", f"file not found: {path}")
        try:
            samples, indices, report = read_annotations(path, on_error=data_config.on_annotation_error)
        except schema.AnnotationError as e:
            raise DataError(f"data.{split}_annotations: {e}") from None
        if not samples:
            raise DataError(f"{path}: no valid sample ({report.num_skipped} invalid; first: "
                            f"{report.skipped_messages[:1]})")
        source = AnnotationSource(samples, indices)
        total, skipped, where = len(source), report.num_skipped, path
        video_root = data_config.video_root or os.path.dirname(os.path.abspath(path))
    shard = list(range(process_index, total, process_count))
    if not shard:
        raise DataError(f"{where}: {total} sample(s) cannot feed process {process_index} of {process_count}")
    return _Plan(source=source, shard_size=len(shard), total_size=total, video_root=video_root,
                 annotations_skipped=skipped,
                 where=f"process {process_index}/{process_count}'s shard of {where}")


def _max_shapes(data_config: ml_collections.ConfigDict, process_count: int) -> bool:
    policy = data_config.shape_policy
    _require(policy in SHAPE_POLICIES, "shape_policy", f"must be one of {SHAPE_POLICIES}, got {policy!r}")
    if policy == "bucket" and process_count > 1:
        raise DataError("config field data.shape_policy: 'bucket' gives batches of different shapes on different "
                        "processes; use 'max' (or 'auto') with process_count > 1")
    return policy == "max" or (policy == "auto" and process_count > 1)


def _ensure_absl_flags_parsed() -> None:
    """Grain worker processes read absl flags (``--grain_*``); outside an absl app (pytest, a
    notebook) they are unparsed and the workers fail. Mark them parsed with their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iter_options(data_config: ml_collections.ConfigDict) -> tuple[grain.ReadOptions, int]:
    _require(data_config.workers >= 0, "workers", f"must be >= 0, got {data_config.workers}")
    if data_config.workers > 0:
        _ensure_absl_flags_parsed()
    _require(data_config.read_threads >= 0, "read_threads", f"must be >= 0, got {data_config.read_threads}")
    read = grain.ReadOptions(num_threads=int(data_config.read_threads),
                             prefetch_buffer_size=max(1, int(data_config.read_buffer_size)))
    return read, int(data_config.workers)


def _loader(data_config, plan: _Plan, *, stage, tokenizer, qformer_tokenizer, seed, train) -> LoadExample:
    return LoadExample(stage=stage, video_root=plan.video_root, decode=decode_settings(data_config),
                       tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                       template=template_config(data_config, tokenizer, train=train),
                       buckets=buckets_from_config(data_config), seed=seed)


def make_train_iterator(data_config: ml_collections.ConfigDict, *, stage: str, tokenizer: TextTokenizer,
                        qformer_tokenizer: QFormerTokenizer, batch_size_per_host: int, process_index: int = 0,
                        process_count: int = 1, seed: int = 0) -> DataIterator:
    """The training stream of this process: shuffled, repeated, batched, checkpointable.

    Args:
      data_config: ``config.data`` (:func:`default_data_config`).
      stage: ``"sft"`` (SFT examples) or ``"fpo"`` (preference examples, annotations with
        ``rejected``).
      tokenizer, qformer_tokenizer: see :func:`load_tokenizers`.
      batch_size_per_host: rows per batch on this process (global batch / process_count).
      process_index, process_count: ``jax.process_index()``, ``jax.process_count()``.
      seed: shuffle and ``<image>`` placement seed (same on every process).

    Returns:
      A :class:`DataIterator` of host batches: dicts of numpy arrays with the keys of
      ``batch.SFT_KEYS`` / ``batch.FPO_KEYS`` + ``batch.HOST_KEYS``, each with a leading axis
      of ``batch_size_per_host`` (``drop_remainder``: every row is a real example).
    """
    if batch_size_per_host < 1:
        raise DataError(f"batch_size_per_host must be >= 1, got {batch_size_per_host}")
    plan = _plan(data_config, split="train", process_index=process_index, process_count=process_count)
    loader = _loader(data_config, plan, stage=stage, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                     seed=seed, train=True)
    max_shapes = _max_shapes(data_config, process_count)
    read_options, workers = _iter_options(data_config)
    num_epochs = data_config.num_epochs
    _require(num_epochs is None or num_epochs >= 1, "num_epochs", f"must be None or >= 1, got {num_epochs}")

    ds = grain.MapDataset.source(plan.source)[process_index::process_count]
    if data_config.shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(TagEpoch(plan.shard_size)).map(loader)
    it_ds = ds.to_iter_dataset(read_options)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(data_config.worker_buffer_size)))
    stats = PipelineStats(annotations_skipped=plan.annotations_skipped)
    it_ds = it_ds.filter(SkipCounter(stats, plan.shard_size, plan.where))
    it_ds = it_ds.batch(batch_size_per_host, drop_remainder=True,
                        batch_fn=Collate(loader.buckets, max_shapes=max_shapes))
    it_ds = _without_filter_warnings(it_ds)
    logger.info("train data: %s, %d of %d samples on this process, batch %d per host, %s shapes, %d workers",
                plan.where, plan.shard_size, plan.total_size, batch_size_per_host,
                "max" if max_shapes else "bucketed", workers)
    return DataIterator(iter(it_ds), stats)


def _without_filter_warnings(ds: grain.IterDataset) -> grain.IterDataset:
    """Grain warns when a filter drops > 90 % of elements; SkipCounter reports skips itself."""
    options = grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None)
    return grain.experimental.WithOptionsIterDataset(ds, options)


def num_eval_batches(num_samples: int, batch_size_per_host: int, process_count: int) -> int:
    """Batches every process yields in one eval pass (the same on all processes)."""
    return math.ceil(math.ceil(num_samples / process_count) / batch_size_per_host)


def make_eval_batches(data_config: ml_collections.ConfigDict, *, stage: str, tokenizer: TextTokenizer,
                      qformer_tokenizer: QFormerTokenizer, batch_size_per_host: int, process_index: int = 0,
                      process_count: int = 1, stats: PipelineStats | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
    """One finite, unshuffled pass over ``data.eval_annotations`` (this process's shard).

    Every batch has ``batch_size_per_host`` rows; the last ones are filled with padding rows
    (``example_id == -1``, every mask False), and every process yields exactly
    :func:`num_eval_batches` batches (whole padding batches when its shard ran out, e.g.
    after skips), so multi-host eval steps stay in lockstep. Pass ``stats`` to read the skip
    counts after the pass. Raises :class:`DataError` when no sample of the shard is usable.
    """
    if batch_size_per_host < 1:
        raise DataError(f"batch_size_per_host must be >= 1, got {batch_size_per_host}")
    plan = _plan(data_config, split="eval", process_index=process_index, process_count=process_count)
    loader = _loader(data_config, plan, stage=stage, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                     seed=0, train=False)
    max_shapes = _max_shapes(data_config, process_count)
    read_options, workers = _iter_options(data_config)
    stats = stats if stats is not None else PipelineStats()
    stats.annotations_skipped = plan.annotations_skipped
    ds = grain.MapDataset.source(plan.source)[process_index::process_count]
    ds = ds.map_with_index(TagEpoch(plan.shard_size)).map(loader)
    it_ds = ds.to_iter_dataset(read_options)
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(data_config.worker_buffer_size)))
    it_ds = it_ds.filter(SkipCounter(stats, plan.shard_size, plan.where))
    it_ds = _without_filter_warnings(it_ds.batch(
        batch_size_per_host, drop_remainder=False,
        batch_fn=Collate(loader.buckets, max_shapes=max_shapes, pad_to=batch_size_per_host)))
    total = num_eval_batches(plan.total_size, batch_size_per_host, process_count)
    return _eval_generator(it_ds, total, stats, plan.where)


def _eval_generator(it_ds: grain.IterDataset, total: int, stats: PipelineStats, where: str
                    ) -> Iterator[dict[str, np.ndarray]]:
    last = None
    produced = 0
    iterator = iter(it_ds)
    try:
        for batch in iterator:
            last = batch
            produced += 1
            yield batch
    finally:
        iterator.close()
    if last is None:
        raise DataError(f"no usable eval sample in {where} ({stats.summary()})")
    filler = collate_lib.pad_batch({k: v[:0] for k, v in last.items()}, len(last["example_id"]))
    for _ in range(produced, total):
        yield {k: v.copy() for k, v in filler.items()}




__all__ = [
    "DataError", "DataIterator", "PipelineStats", "SKIP_REASONS", "default_data_config", "load_tokenizers",
    "make_eval_batches", "make_train_iterator", "num_eval_batches", "decode_settings", "buckets_from_config",
    "template_config", "read_annotations", "LoadExample", "SkipCounter", "Collate", "SourceRecord",
    "SkippedRecord", "AnnotationSource", "TagEpoch",
]
