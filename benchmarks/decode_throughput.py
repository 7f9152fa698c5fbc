r"""Video decode throughput of ``d2vlm_jax.data.video.decode_video`` on the synthetic set.

Decodes every clip of a synthetic dataset (1 fps sampling, resize + center crop to
--image_size) three ways and prints frames/s:

  single      one process, a plain loop;
  pool        ``multiprocessing.Pool(--workers)`` (no Grain);
  grain       ``grain.MapDataset.source(paths).map(Decode()).to_iter_dataset()
              .mp_prefetch(MultiprocessingOptions(num_workers=--workers))``.

"frames" are the sampled output frames (what the model sees), not the decoded source
frames; the table also gives the source frame rate so the decode work is visible. This is a
program, not a test: numbers depend on the machine and its load (printed with the table).

Usage:
  python benchmarks/decode_throughput.py                       # 64x64 clips, 4 fps
  python benchmarks/decode_throughput.py --frame_size 224 --video_fps 3 --num_clips 48
  python benchmarks/decode_throughput.py --data_dir /tmp/synthetic --image_size 224
"""

from __future__ import annotations

import os

# One decode per core: keep numpy's BLAS (the resize matmuls) single-threaded. This must
# be set before numpy is imported; spawned pool/Grain workers inherit it. Left unset,
# OpenBLAS threads oversubscribe the cores: on the shared 2-core machine decoding was about
# 4x slower (190 vs 800 frames/s single-process). Override by setting the variables.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import glob  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import av  # noqa: E402
import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from d2vlm_jax.data import synthetic  # noqa: E402
from d2vlm_jax.data.video import decode_video  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", None, "An existing synthetic dataset (its "
                                "videos/*.mp4 are decoded). Default: generate one into a "
                                "temporary directory.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 96, "Clips to generate when --data_dir is "
                                  "not given.")
_FRAME_SIZE = flags.DEFINE_integer("frame_size", 64, "Frame size of generated clips.")
_VIDEO_FPS = flags.DEFINE_integer("video_fps", 4, "Frame rate of generated clips.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "decode_video image_size.")
_FPS = flags.DEFINE_float("fps", 1.0, "decode_video sampling rate.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes for pool and grain.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Passes over the videos per mode (best "
                                "pass reported).")


class Decode(grain.transforms.Map):
    """Grain transform: path -> number of sampled frames (frames stay in the worker)."""

    def __init__(self, image_size: int, fps: float):
        self.image_size = image_size
        self.fps = fps

    def map(self, path: str) -> int:
        return decode_video(path, fps=self.fps, image_size=self.image_size).frames.shape[0]


def _decode_count(args: tuple[str, int, float]) -> int:
    path, image_size, fps = args
    return decode_video(path, fps=fps, image_size=image_size).frames.shape[0]


def _run_single(paths: list[str], image_size: int, fps: float) -> int:
    return sum(_decode_count((p, image_size, fps)) for p in paths)


def _run_pool(paths: list[str], image_size: int, fps: float, workers: int
              ) -> tuple[int, float]:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_count, [(paths[0], image_size, fps)] * workers)   # warm up imports
        begin = time.perf_counter()
        total = sum(pool.imap_unordered(_decode_count,
                                        [(p, image_size, fps) for p in paths], chunksize=2))
        return total, time.perf_counter() - begin


def _run_grain(paths: list[str], image_size: int, fps: float, workers: int) -> tuple[int, float]:
    dataset = (grain.MapDataset.source(paths).map(Decode(image_size, fps))
               .to_iter_dataset()
               .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
    iterator = iter(dataset)
    begin = None
    total = 0
    for count in iterator:
        if begin is None:   # the first element includes starting the workers
            begin = time.perf_counter()
            continue
        total += count
    return total, time.perf_counter() - begin


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.machine()} {platform.processor() or ''} | {os.cpu_count()} CPUs | "
            f"load avg {load[0]:.2f} | Python {platform.python_version()} | PyAV "
            f"{av.__version__} (FFmpeg {av.ffmpeg_version_info}) | "
            f"numpy {np.__version__} | OPENBLAS_NUM_THREADS="
            f"{os.environ.get('OPENBLAS_NUM_THREADS')}")


def main(argv: list[str]) -> None:
    del argv
    temporary = None
    data_dir = _DATA_DIR.value
    if data_dir is None:
        temporary = tempfile.TemporaryDirectory()
        data_dir = temporary.name
        settings = synthetic.SyntheticSettings(
            frame_size=_FRAME_SIZE.value, video_fps=_VIDEO_FPS.value,
            object_radius=max(9, _FRAME_SIZE.value // 7))
        begin = time.perf_counter()
        synthetic.generate_synthetic(data_dir, num_train=_NUM_CLIPS.value, num_val=0,
                                     settings=settings, write_tokenizers=False)
        print(f"generated {_NUM_CLIPS.value} clips ({_FRAME_SIZE.value}x{_FRAME_SIZE.value}, "
              f"{_VIDEO_FPS.value} fps) in {time.perf_counter() - begin:.1f} s",
              file=sys.stderr)
    paths = sorted(glob.glob(os.path.join(data_dir, "videos", "*.mp4")))
    if not paths:
        raise app.UsageError(f"no videos under {data_dir}/videos")
    image_size, fps, workers = _IMAGE_SIZE.value, _FPS.value, _WORKERS.value
    with av.open(paths[0]) as container:
        stream = container.streams.video[0]
        source = f"{stream.width}x{stream.height} @ {float(stream.average_rate):g} fps"

    rows = []
    for mode in ("single", "pool", "grain"):
        best = None
        for _ in range(_REPEATS.value):
            if mode == "single":
                begin = time.perf_counter()
                frames = _run_single(paths, image_size, fps)
                seconds = time.perf_counter() - begin
                videos = len(paths)
            elif mode == "pool":
                frames, seconds = _run_pool(paths, image_size, fps, workers)
                videos = len(paths)
            else:
                frames, seconds = _run_grain(paths, image_size, fps, workers)
                videos = len(paths) - 1
            if best is None or frames / seconds > best[1] / best[2]:
                best = (videos, frames, seconds)
        rows.append((mode, 1 if mode == "single" else workers, *best))

    print(f"machine: {_machine()}")
    print(f"videos: {len(paths)} clips, source {source}; sampling {fps:g} fps, "
          f"output {image_size}x{image_size}")
    print(f"{'mode':<8} {'workers':>7} {'videos':>7} {'frames':>7} {'seconds':>8} "
          f"{'frames/s':>9} {'videos/s':>9}")
    for mode, n_workers, videos, frames, seconds in rows:
        print(f"{mode:<8} {n_workers:>7} {videos:>7} {frames:>7} {seconds:>8.2f} "
              f"{frames / seconds:>9.1f} {videos / seconds:>9.1f}")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    app.run(main)
