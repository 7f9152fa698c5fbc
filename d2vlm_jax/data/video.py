"""Video decoding for the data pipeline: PyAV decode, 1 fps sampling, resize + center crop.

:func:`decode_video` returns RGB ``uint8[N, S, S, 3]`` frames (``S = image_size``) and the
timestamp of each, **not normalized** (the model applies CLIP normalization on device,
see ``d2vlm_jax/batch.py``).

Sampling (SPEC §2.2, the authors' ``load_video``): target times ``t_k = k / fps`` for
``k = 0 .. ceil(duration * fps) - 1``; the frame for ``t_k`` is the decoded frame whose
presentation time is closest to ``t_k`` (the earlier one on a tie). At the default 1 fps
frame index = second. When there are more than ``max_frames`` targets, ``max_frames`` of
them are taken uniformly (``round(linspace(0, K - 1, max_frames))``); ``frame_times`` keeps
the true time of every returned frame, so annotations in seconds still map correctly
(:func:`seconds_to_frame_interval`). Frames are decoded in one streaming pass and only the
selected ones are converted to RGB, so memory is ``O(max_frames)`` whatever the length.

Resize: the short side becomes ``image_size`` (long side ``int(image_size * long /
short)``, as torchvision's ``Resize``), then a center crop (offset ``(long - size) // 2``).
The filter is **antialiased bilinear** (a triangle filter widened by the downscale factor,
PIL's and ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``'s algorithm,
which the authors' transform uses). It is implemented here in numpy with precomputed
weight matrices (two small matmuls per frame, only over the source window the crop needs)
rather than with swscale via ``VideoFrame.reformat``: swscale's bilinear differs from
the reference by a few grey levels, this one matches torch to rounding (tested). PIL is not
a dependency.

Errors are :class:`VideoError` subclasses whose message names the path and the reason:
:class:`VideoNotFoundError`, :class:`CorruptVideoError` (undecodable, no video stream,
decode failure, frames ending more than ``TRUNCATION_TOLERANCE_S`` before the declared
duration), :class:`EmptyVideoError` (0-byte file, no frames),
:class:`VideoTooShortError`, :class:`VideoTooLongError`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import av
import numpy as np

logger = logging.getLogger(__name__)

# A video whose decoded frames end more than this before its declared duration is corrupt
# (typically a truncated download); a smaller gap is a metadata rounding: the sampled
# frames past the decoded end are dropped with a warning.
TRUNCATION_TOLERANCE_S = 1.0


class VideoError(Exception):
    """A video that cannot be used. ``path`` and ``reason`` are also attributes."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class VideoNotFoundError(VideoError):
    """The file does not exist."""


class CorruptVideoError(VideoError):
    """The file cannot be opened or decoded as a video (random bytes, truncated, ...)."""


class EmptyVideoError(VideoError):
    """The file is empty (0 bytes) or decodes to zero frames."""


class VideoTooShortError(VideoError):
    """Duration below ``min_duration``."""


class VideoTooLongError(VideoError):
    """Duration above ``max_duration``."""


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    """A sampled, resized video.

    Attributes:
      frames: uint8[N, S, S, 3] RGB, S = image_size, not normalized.
      frame_times: float32[N] presentation time in seconds of each frame (from the stream
        start), increasing.
      duration: video duration in seconds.
    """
    frames: np.ndarray
    frame_times: np.ndarray
    duration: float


# ----------------------------------------------------------------------------- resize


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


@functools.lru_cache(maxsize=64)
def antialias_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """float32[out_size, in_size] weights of antialiased bilinear resampling along one axis.

    Row ``i`` holds the normalized triangle-filter weights of output pixel ``i``; the
    filter support is widened by the downscale factor (PIL's / torch ``antialias=True``
    algorithm, ``align_corners=False``). For ``in_size == out_size`` it is the identity.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _triangle((taps - center + 0.5) * invscale)
        total = w.sum()
        if total > 0:
            weights[i, xmin:xmax] = w / total
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _resize_crop_plan(height: int, width: int, size: int
                      ) -> tuple[np.ndarray, slice, np.ndarray, slice]:
    """Weights restricted to the center crop: (rows_w, rows_src, cols_w, cols_src)."""
    short, long = min(height, width), max(height, width)
    long_out = int(size * long / short)
    offset = (long_out - size) // 2
    if height <= width:
        h_w = antialias_bilinear_weights(height, size)
        w_w = antialias_bilinear_weights(width, long_out)[offset:offset + size]
    else:
        h_w = antialias_bilinear_weights(height, long_out)[offset:offset + size]
        w_w = antialias_bilinear_weights(width, size)

    def restrict(w: np.ndarray) -> tuple[np.ndarray, slice]:
        nonzero = np.nonzero(w.any(axis=0))[0]
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        return np.ascontiguousarray(w[:, lo:hi]), slice(lo, hi)

    h_w, h_src = restrict(h_w)
    w_w, w_src = restrict(w_w)
    return h_w, h_src, w_w, w_src


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8[H, W, 3] → uint8[size, size, 3]: short side to ``size``, then center crop.

    Antialiased bilinear (see module docstring), rounded to nearest and clipped to [0, 255].
    """
    height, width = image.shape[:2]
    h_w, h_src, w_w, w_src = _resize_crop_plan(height, width, size)
    window = image[h_src, w_src].astype(np.float32).transpose(2, 0, 1)   # [3, h, w]
    out = h_w @ window @ w_w.T                                           # [3, size, size]
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(1, 2, 0))


# ----------------------------------------------------------------------------- decode


def _probe_duration(container: av.container.InputContainer, stream: av.video.VideoStream,
                    path: str) -> float | None:
    """Duration in seconds from stream/container metadata, else from the packet times.

    The packet scan reads the file through a second container (no seek on the first one,
    which raw streams do not support). None when no duration can be found.
    """
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    last_end, first = None, None
    with av.open(path) as scan:
        for packet in scan.demux(scan.streams.video[0]):
            if packet.pts is None or packet.time_base is None:
                continue
            begin = float(packet.pts * packet.time_base)
            end = begin + float((packet.duration or 0) * packet.time_base)
            first = begin if first is None else min(first, begin)
            last_end = end if last_end is None else max(last_end, end)
    if last_end is None:
        return None
    return last_end - first


def _target_times(duration: float, fps: float, max_frames: int) -> np.ndarray:
    """float64[K] sampling times: k / fps for k < ceil(duration * fps), subsampled."""
    count = max(1, math.ceil(duration * fps - 1e-6))
    indices = np.arange(count)
    if count > max_frames:
        indices = np.round(np.linspace(0, count - 1, max_frames)).astype(np.int64)
    return indices / fps


def decode_video(path: str | os.PathLike, *, fps: float = 1.0, max_frames: int = 350,
                 min_duration: float = 0.0, max_duration: float | None = None,
                 image_size: int = 224, decode_threads: int = 1) -> DecodedVideo:
    """Decodes, samples and resizes one video (see the module docstring).

    Args:
      path: video file.
      fps: sampling rate in frames per second (1.0: frame index = second).
      max_frames: at most this many frames; longer videos are subsampled uniformly.
      min_duration, max_duration: accepted duration range in seconds (None: no maximum);
        checked on the container's duration before decoding.
      image_size: side S of the square output frames.
      decode_threads: FFmpeg decoder threads (1 for data-loader workers; 0 lets FFmpeg
        choose).

    Returns:
      DecodedVideo with frames uint8[N, S, S, 3], frame_times float32[N], duration.

    Raises:
      VideoNotFoundError, EmptyVideoError, CorruptVideoError, VideoTooShortError,
      VideoTooLongError (all :class:`VideoError`): message names the path and the reason.
    """
    if fps <= 0 or max_frames < 1 or image_size < 1:
        raise ValueError(f"need fps > 0, max_frames >= 1, image_size >= 1; got fps={fps}, "
                         f"max_frames={max_frames}, image_size={image_size}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoNotFoundError(path, "file not found")
    if os.path.isdir(path):
        raise CorruptVideoError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(path, "file is empty (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise CorruptVideoError(path, f"cannot open as a video container ({error})") from None
    with container:
        if not container.streams.video:
            raise CorruptVideoError(path, "has no video stream")
        stream = container.streams.video[0]
        stream.thread_count = decode_threads
        if decode_threads != 1:
            stream.thread_type = "AUTO"
        try:
            duration = _probe_duration(container, stream, path)
        except av.FFmpegError as error:
            raise CorruptVideoError(path, f"cannot read packets ({error})") from None
        if duration is None:
            raise CorruptVideoError(path, "cannot determine the duration: no stream or "
                                          "container duration and no packet timestamps "
                                          "(raw elementary streams are not supported)")
        if duration <= 0:
            raise EmptyVideoError(path, f"duration is {duration} s (no frames)")
        if duration < min_duration:
            raise VideoTooShortError(path, f"duration {duration:.3f} s is shorter than "
                                           f"min_duration {min_duration} s")
        if max_duration is not None and duration > max_duration:
            raise VideoTooLongError(path, f"duration {duration:.3f} s is longer than "
                                          f"max_duration {max_duration} s")
        targets = _target_times(duration, fps, max_frames)
        frames, frame_times, decoded_end = _sample_frames(container, stream, targets, path,
                                                          image_size)
    if len(frames) < len(targets):
        if duration - decoded_end > TRUNCATION_TOLERANCE_S:
            raise CorruptVideoError(path, f"decoded frames end at {decoded_end:.3f} s but the "
                                          f"video stream's duration is {duration:.3f} s "
                                          "(truncated or corrupt file)")
        logger.warning("%s: decoded frames end at %.3f s but the container says %.3f s; "
                       "%d sampled frame(s) past the end dropped", path, decoded_end,
                       duration, len(targets) - len(frames))
        duration = decoded_end
    return DecodedVideo(frames=np.stack(frames), frame_times=np.asarray(frame_times,
                                                                        np.float32),
                        duration=float(duration))


def _sample_frames(container, stream, targets: np.ndarray, path: str, image_size: int
                   ) -> tuple[list[np.ndarray], list[float], float]:
    """One decoding pass; returns the selected resized frames, their times, decoded end."""
    start_time = (float(stream.start_time * stream.time_base)
                  if stream.start_time is not None else None)
    selected: list[np.ndarray] = []
    selected_times: list[float] = []
    converted: dict[int, np.ndarray] = {}   # id of a decoded frame -> resized RGB

    def take(frame: av.VideoFrame, time: float, serial: int) -> None:
        if serial not in converted:
            converted.clear()
            converted[serial] = resize_center_crop(frame.to_ndarray(format="rgb24"),
                                                   image_size)
        selected.append(converted[serial])
        selected_times.append(time)

    previous = None   # (frame, time, serial)
    next_target = 0
    num_decoded = 0
    last_period = 0.0
    rate = float(stream.average_rate) if stream.average_rate else None
    try:
        for frame in container.decode(stream):
            if frame.time is not None:
                raw_time = frame.time
            elif rate is not None:       # no timestamps (raw elementary stream): use the rate
                raw_time = num_decoded / rate + (start_time or 0.0)
            else:
                continue
            if start_time is None:
                start_time = raw_time
            time = raw_time - start_time
            if previous is not None and time > previous[1]:
                last_period = time - previous[1]
            while next_target < len(targets) and time >= targets[next_target]:
                target = targets[next_target]
                if previous is not None and target - previous[1] <= time - target:
                    take(*previous)
                else:
                    take(frame, time, num_decoded)
                next_target += 1
            previous = (frame, time, num_decoded)
            num_decoded += 1
            if next_target == len(targets):
                break
    except av.FFmpegError as error:
        raise CorruptVideoError(path, f"decoding failed after {num_decoded} frame(s) "
                                      f"({error})") from None
    if previous is None:
        raise EmptyVideoError(path, "no frame with a timestamp could be decoded")
    if last_period == 0.0 and rate is not None:
        last_period = 1.0 / rate
    decoded_end = previous[1] + last_period
    # Targets after the last decoded frame but before its end still show that frame.
    while next_target < len(targets) and targets[next_target] < decoded_end - 1e-6:
        take(*previous)
        next_target += 1
    return selected, selected_times, decoded_end


def seconds_to_frame_interval(start: float, end: float,
                              frame_times: np.ndarray) -> tuple[int, int]:
    """The inclusive frame-index interval ``(first, last)`` covering ``[start, end]`` s.

    Each end maps to the frame nearest in time under the ``frame_times`` mapping (linear
    interpolation of the index between frames, then round half to even, then clip to
    ``[0, N - 1]``); a reversed interval is swapped (SPEC §2.2). With 1 fps frames at
    ``0, 1, 2, ...`` this is ``round(t)`` clipped, the authors' rule.

    Args:
      start, end: seconds.
      frame_times: float[N] increasing frame times in seconds (N >= 1).
    """
    times = np.asarray(frame_times, np.float64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"frame_times must be a non-empty 1-D array, got shape {times.shape}")
    positions = np.arange(times.size, dtype=np.float64)
    if times.size == 1:
        return 0, 0
    first = int(np.clip(np.rint(np.interp(start, times, positions)), 0, times.size - 1))
    last = int(np.clip(np.rint(np.interp(end, times, positions)), 0, times.size - 1))
    if last < first:
        first, last = last, first
    return first, last
