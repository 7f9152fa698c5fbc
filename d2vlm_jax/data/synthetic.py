"""The embedded default dataset: small synthetic clips of shapes appearing over known times.

Each clip (default 64×64 pixels, 8–16 s at 4 fps, H.264 in mp4) shows 1–3 *events*: an
object of one shape (circle, square, triangle, diamond) and one colour (red, green, blue,
yellow) appears at an integer second ``start``, glides horizontally in its own lane (top,
middle, bottom: objects never overlap) and vanishes after ``end``; it is visible exactly on
the video frames with ``start <= t <= end``, so at 1 fps sampling the frames
``start .. end`` show it and the annotated interval ``[start, end]`` maps to those frame
indices. The background is a flat grey with a static noise texture.

Design goals:

* **learnable by a tiny model**: objects are big (18 px of 64) saturated colours on grey,
  so one frame clearly shows which objects are present;
* **impossible without the video**: every clip draws its duration, its objects and their
  times uniformly at random, so no interval or object is a good text-only guess
  (``manifest.json`` records the validation mIoU of two "video-blind" guesses: the most
  common training interval, and the whole clip — events last at most a third of it);
* **deterministic**: clip ``i`` of a split depends only on ``(seed, split, i)``
  (``numpy.random.default_rng([seed, split_id, i])``): same seed → identical annotations and
  identical rendered frames (:func:`render_clip`), whatever the number of clips.

Three samples per clip, one per task (schema of SPEC §2.3):

* ``tvg`` — "When does the red circle appear?" → "The red circle appears at <evi>.";
* ``dvc`` — "Describe all events with their times." → "<evi> a red circle appears. <evi> a
  blue square appears." (events ordered by start; starts are distinct within a clip);
* ``rvc`` — "What appears at <evi>?" with the event as ``question_events`` → "A red circle
  appears at <evi>." (the question's interval is the event's own, so the answer is unique).

:func:`generate_synthetic` writes ``videos/{split}_{i:05d}.mp4``, ``train.json``,
``val.json``, ``clips.json`` (every clip's spec), the tiny tokenizers (trained by
``d2vlm_jax.data.tokenizer.train_tiny_tokenizers`` on a fixed corpus of every template with
every object, so they do not depend on the seed or the counts) and ``manifest.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import av
import numpy as np

from d2vlm_jax.data.schema import Sample, save_annotations

GENERATOR_VERSION = "1.0"

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
}
TASKS = ("tvg", "dvc", "rvc")
SPLIT_IDS = {"train": 0, "val": 1}

TVG_TEMPLATES = (
    ("When does the {obj} appear?", "The {obj} appears at <evi>."),
    ("When is the {obj} visible?", "The {obj} is visible at <evi>."),
)
DVC_QUESTION = "Describe all events with their times."
DVC_EVENT = "<evi> a {obj} appears."
RVC_QUESTION = "What appears at <evi>?"
RVC_ANSWER = "A {obj} appears at <evi>."


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    """Rendering and encoding settings (recorded in ``manifest.json``).

    Attributes:
      frame_size: frame height = width in pixels.
      video_fps: frames per second of the written video (integer).
      min_duration, max_duration: clip duration range, integer seconds (inclusive).
      max_events: events per clip are uniform in ``1 .. max_events`` (at most 3 lanes).
      object_radius: half the object size in pixels.
      noise_amplitude: static background noise, ± grey levels.
      crf: libx264 constant rate factor (lower = closer to the rendered frames).
    """
    frame_size: int = 64
    video_fps: int = 4
    min_duration: int = 8
    max_duration: int = 16
    max_events: int = 3
    object_radius: int = 9
    noise_amplitude: int = 10
    crf: int = 12

    def __post_init__(self) -> None:
        if not 1 <= self.max_events <= 3:
            raise ValueError(f"max_events must be in 1..3 (one lane each), got {self.max_events}")
        if not 2 <= self.min_duration <= self.max_duration:
            raise ValueError(f"need 2 <= min_duration <= max_duration, got "
                             f"{self.min_duration}, {self.max_duration}")
        if self.min_duration < self.max_events:
            raise ValueError("min_duration must allow distinct start seconds for every event")
        if self.frame_size < 6 * self.object_radius:
            raise ValueError(f"frame_size {self.frame_size} too small for three lanes of "
                             f"objects of radius {self.object_radius}")


@dataclasses.dataclass(frozen=True)
class ObjectEvent:
    """One object on screen: visible on frames with ``start <= t <= end`` (seconds).

    Attributes:
      shape, colour: names from :data:`SHAPES`, :data:`COLOURS`.
      start, end: integer seconds, ``0 <= start <= end <= duration - 1``; the object is
        shown for ``end - start + 1 <= max(1, duration // 3)`` seconds.
      lane: 0 (top), 1 (middle), 2 (bottom).
      x_start, x_end: horizontal centre (pixels) at ``start`` and at ``end``.
    """
    shape: str
    colour: str
    start: int
    end: int
    lane: int
    x_start: float
    x_end: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip (``render_clip``) and annotate it.

    Attributes:
      split, index: which clip; ``video`` is its path relative to the dataset root.
      duration: seconds (integer valued).
      settings: rendering settings.
      background: grey level of the background.
      noise_seed: seed of the static background noise.
      events: the objects, ordered by start.
      template_choice: which :data:`TVG_TEMPLATES` entry the tvg sample uses.
      tvg_event, rvc_event: index of the event the tvg / rvc samples ask about.
    """
    split: str
    index: int
    duration: int
    settings: SyntheticSettings
    background: int
    noise_seed: int
    events: tuple[ObjectEvent, ...]
    template_choice: int
    tvg_event: int
    rvc_event: int

    @property
    def video(self) -> str:
        return f"videos/{self.split}_{self.index:05d}.mp4"

    @property
    def num_frames(self) -> int:
        return self.duration * self.settings.video_fps

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["video"] = self.video
        return record


def make_clip_spec(seed: int, split: str, index: int,
                   settings: SyntheticSettings = SyntheticSettings()) -> ClipSpec:
    """Draws clip ``index`` of ``split`` from ``default_rng([seed, split_id, index])``."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    duration = int(rng.integers(settings.min_duration, settings.max_duration + 1))
    num_events = int(rng.integers(1, settings.max_events + 1))
    kinds = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    chosen_kinds = rng.choice(len(kinds), size=num_events, replace=False)
    lanes = rng.permutation(3)[:num_events]
    starts = np.sort(rng.choice(duration, size=num_events, replace=False))
    radius, size = settings.object_radius, settings.frame_size
    events = []
    for k in range(num_events):
        start = int(starts[k])
        length = int(rng.integers(1, max(1, duration // 3) + 1))     # seconds shown
        end = min(start + length - 1, duration - 1)                    # inclusive
        x_start, x_end = rng.uniform(radius + 1, size - radius - 1, size=2)
        shape, colour = kinds[int(chosen_kinds[k])]
        events.append(ObjectEvent(shape=shape, colour=colour, start=start, end=end,
                                  lane=int(lanes[k]), x_start=round(float(x_start), 3),
                                  x_end=round(float(x_end), 3)))
    return ClipSpec(split=split, index=index, duration=duration, settings=settings,
                    background=int(rng.integers(50, 110)),
                    noise_seed=int(rng.integers(0, 2**31 - 1)), events=tuple(events),
                    template_choice=int(rng.integers(len(TVG_TEMPLATES))),
                    tvg_event=int(rng.integers(num_events)),
                    rvc_event=int(rng.integers(num_events)))


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float,
                radius: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":   # apex up, base at the bottom
        rel = (dy + radius) / (2 * radius)                  # 0 at the apex, 1 at the base
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * radius)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(spec: ClipSpec) -> np.ndarray:
    """The generator's ground-truth frames: uint8[T, H, W, 3] RGB, T = duration × video_fps.

    Frame ``j`` is at time ``j / video_fps`` seconds.
    """
    settings = spec.settings
    size, fps = settings.frame_size, settings.video_fps
    noise = np.random.default_rng(spec.noise_seed).integers(
        -settings.noise_amplitude, settings.noise_amplitude + 1, size=(size, size, 1))
    background = np.clip(spec.background + noise, 0, 255).astype(np.uint8)
    frames = np.repeat(np.broadcast_to(background, (size, size, 3))[None],
                       spec.num_frames, axis=0)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    lane_height = size / 3
    for event in spec.events:
        cy = (event.lane + 0.5) * lane_height
        colour = np.asarray(COLOURS[event.colour], np.uint8)
        span = max(event.end - event.start, 1)
        for j in range(spec.num_frames):
            t = j / fps
            if not event.start <= t <= event.end:
                continue
            cx = event.x_start + (event.x_end - event.x_start) * (t - event.start) / span
            frames[j][_shape_mask(event.shape, xs, ys, cx, cy, settings.object_radius)] = colour
    return frames


def write_clip(frames: np.ndarray, path: str | os.PathLike, *, fps: int, crf: int) -> None:
    """Encodes uint8[T, H, W, 3] RGB frames as H.264 (libx264, yuv420p) in an mp4."""
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps,
                                      options={"crf": str(crf), "preset": "veryfast",
                                               "threads": "1"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for j, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = j
            frame.time_base = fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def clip_samples(spec: ClipSpec, tasks: Sequence[str] = TASKS) -> list[Sample]:
    """The annotation samples of one clip, one per task (see module docstring)."""
    samples = []
    duration = float(spec.duration)
    for task in tasks:
        if task == "tvg":
            event = spec.events[spec.tvg_event]
            question, answer = TVG_TEMPLATES[spec.template_choice]
            samples.append(Sample(video=spec.video, duration=duration, task="tvg",
                                  question=question.format(obj=event.name),
                                  answer=answer.format(obj=event.name),
                                  events=((event.start, event.end),)))
        elif task == "dvc":
            answer = " ".join(DVC_EVENT.format(obj=e.name) for e in spec.events)
            samples.append(Sample(video=spec.video, duration=duration, task="dvc",
                                  question=DVC_QUESTION, answer=answer,
                                  events=tuple((e.start, e.end) for e in spec.events)))
        elif task == "rvc":
            event = spec.events[spec.rvc_event]
            interval = ((event.start, event.end),)
            samples.append(Sample(video=spec.video, duration=duration, task="rvc",
                                  question=RVC_QUESTION,
                                  answer=RVC_ANSWER.format(obj=event.name),
                                  events=interval, question_events=interval))
        else:
            raise ValueError(f"unknown synthetic task {task!r}; one of {TASKS}")
    return samples


def tokenizer_corpus() -> list[str]:
    """Every question/answer template with every object: the tiny tokenizers' corpus."""
    texts = [DVC_QUESTION, RVC_QUESTION]
    for shape in SHAPES:
        for colour in COLOURS:
            obj = f"{colour} {shape}"
            for question, answer in TVG_TEMPLATES:
                texts += [question.format(obj=obj), answer.format(obj=obj)]
            texts += [DVC_EVENT.format(obj=obj), RVC_ANSWER.format(obj=obj)]
    return texts


def _interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a == b)


def blind_baseline(train: Sequence[Sample], val: Sequence[Sample]) -> dict[str, Any]:
    """How well two video-blind guesses ground the validation ``tvg`` events.

    * ``most_common``: always answer the most common training tvg interval;
    * ``whole_video``: always answer the whole clip (a blind model may know its length).

    Intervals are compared as frame spans at 1 fps (``[s, e + 1)``), so a point interval
    has length one second. Returns mIoU and R@0.5 of each guess.
    """
    train_intervals = [e for s in train if s.task == "tvg" for e in s.events]
    val_events = [(e, s.duration) for s in val if s.task == "tvg" for e in s.events]
    if not train_intervals or not val_events:
        return {"most_common_train_interval": None}
    guess, _ = collections.Counter(train_intervals).most_common(1)[0]
    results: dict[str, Any] = {"most_common_train_interval": list(guess)}
    guesses = {"most_common": lambda duration: (guess[0], guess[1] + 1),
               "whole_video": lambda duration: (0.0, duration)}
    for name, make_guess in guesses.items():
        ious = np.asarray([_interval_iou(make_guess(duration), (v[0], v[1] + 1))
                           for v, duration in val_events])
        results[f"{name}_val_miou"] = float(ious.mean())
        results[f"{name}_val_r_at_0_5"] = float((ious >= 0.5).mean())
    return results


def generate_synthetic(out_dir: str | os.PathLike, *, num_train: int = 256,
                       num_val: int = 32, seed: int = 0,
                       settings: SyntheticSettings = SyntheticSettings(),
                       tasks: Sequence[str] = TASKS, write_tokenizers: bool = True,
                       progress: Callable[[str, int, int], None] | None = None
                       ) -> dict[str, Any]:
    """Writes the synthetic dataset into ``out_dir`` and returns its manifest.

    Args:
      out_dir: created if needed; existing files of the same names are overwritten.
      num_train, num_val: number of clips per split (each gives ``len(tasks)`` samples).
      seed: the dataset seed.
      settings: rendering/encoding settings.
      tasks: which of :data:`TASKS` to annotate.
      write_tokenizers: also train and write the tiny tokenizers.
      progress: called as ``progress(split, clips_done, clips_total)`` after each clip.

    Returns:
      The manifest dict (also written to ``manifest.json``).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    splits = {"train": num_train, "val": num_val}
    all_samples: dict[str, list[Sample]] = {}
    all_specs: dict[str, list[dict[str, Any]]] = {}
    for split, count in splits.items():
        samples, specs = [], []
        for index in range(count):
            spec = make_clip_spec(seed, split, index, settings)
            write_clip(render_clip(spec), os.path.join(out_dir, spec.video),
                       fps=settings.video_fps, crf=settings.crf)
            samples += clip_samples(spec, tasks)
            specs.append(spec.to_dict())
            if progress is not None:
                progress(split, index + 1, count)
        save_annotations(samples, os.path.join(out_dir, f"{split}.json"))
        all_samples[split], all_specs[split] = samples, specs
    with open(os.path.join(out_dir, "clips.json"), "w", encoding="utf-8") as f:
        json.dump(all_specs, f, indent=1)

    tokenizer_files = None
    if write_tokenizers:
        from d2vlm_jax.data.tokenizer import train_tiny_tokenizers
        llm_path, qformer_path = train_tiny_tokenizers(tokenizer_corpus(), out_dir)
        tokenizer_files = {"llm": os.path.relpath(llm_path, out_dir),
                           "qformer": os.path.relpath(qformer_path, out_dir)}

    manifest = {
        "generator": "d2vlm_jax.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_clips": {split: count for split, count in splits.items()},
        "num_samples": {split: len(s) for split, s in all_samples.items()},
        "tasks": list(tasks),
        "settings": dataclasses.asdict(settings),
        "codec": "libx264 yuv420p mp4",
        "annotations": {split: f"{split}.json" for split in splits},
        "clips": "clips.json",
        "tokenizers": tokenizer_files,
        "blind_baseline": blind_baseline(all_samples["train"], all_samples["val"]),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest

