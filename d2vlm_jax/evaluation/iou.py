"""Temporal IoU, in each arithmetic a scoring protocol uses, and seconds <-> frames.

Three IoUs live side by side so that a protocol's choice is visible:

* :func:`temporal_iou` / :func:`pairwise_temporal_iou` -- the project's: float64, a
  zero-length union gives 0.
* :func:`float32_pairwise_iou` -- the E.T. Bench scripts' (``nncore.ops.temporal_iou`` on
  ``torch.Tensor`` inputs): inputs rounded to float32, ``inter / (area1 + area2 - inter)``
  in float32, ``inter = clamp(min(ends) - max(starts), 0)``; no reordering of reversed
  intervals, a zero union gives NaN (0/0), NaN and inf propagate. The callers compare the
  float32 result with float64 thresholds, so an IoU of exactly 7/10 is
  ``float32(0.7) = 0.69999999`` and misses ``>= 0.7``.
* :func:`densevid_iou` -- the dense-captioning evaluator's (E.T. Bench's ``DVCEval``):
  float64, union ``min(hull, len1 + len2)``, divided by ``union + 1e-8``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Interval = tuple[float, float]


# ------------------------------------------------------------------- project (float64)

def temporal_iou(first: Interval, second: Interval) -> float:
    """IoU of two intervals in seconds; 0 when the union is empty (both zero-length)."""
    intersection = max(0.0, min(first[1], second[1]) - max(first[0], second[0]))
    union = (first[1] - first[0]) + (second[1] - second[0]) - intersection
    return float(intersection / union) if union > 0 else 0.0


def pairwise_temporal_iou(first: Sequence[Interval], second: Sequence[Interval]) -> np.ndarray:
    """float64[A, B] IoU of every interval of ``first`` with every interval of ``second``."""
    a = np.asarray(first, np.float64).reshape(-1, 2)
    b = np.asarray(second, np.float64).reshape(-1, 2)
    intersection = np.clip(np.minimum(a[:, None, 1], b[None, :, 1])
                           - np.maximum(a[:, None, 0], b[None, :, 0]), 0.0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


# ------------------------------------------------------- E.T. Bench scripts (float32)

def float32_windows(windows: Sequence) -> np.ndarray:
    """float32[N, 2] from a list of ``[start, end]`` (what ``torch.Tensor(windows)`` makes).

    Raises ValueError unless the input is a non-empty list of pairs.
    """
    with np.errstate(over="ignore"):
        array = np.asarray(windows, dtype=np.float64).astype(np.float32)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"expected a non-empty list of [start, end], got shape {array.shape}")
    return array


def float32_pairwise_iou(windows1: Sequence, windows2: Sequence) -> np.ndarray:
    """float32[N, M]: ``nncore.ops.temporal_iou(torch.Tensor(w1), torch.Tensor(w2))``.

    Same operations in the same order on float32 values (IEEE float32 arithmetic is exact
    to the bit whichever library performs it): areas ``e - s``; intersection
    ``max(min(e1, e2) - max(s1, s2), 0)`` with NaN propagated (``clamp``); IoU
    ``inter / ((area1 + area2) - inter)``.
    """
    a = float32_windows(windows1)
    b = float32_windows(windows2)
    with np.errstate(all="ignore"):
        area1 = a[:, 1] - a[:, 0]
        area2 = b[:, 1] - b[:, 0]
        start = np.maximum(a[:, None, 0], b[None, :, 0])
        end = np.minimum(a[:, None, 1], b[None, :, 1])
        inter = np.maximum(end - start, np.float32(0))  # NaN propagates, as torch.clamp
        union = (area1[:, None] + area2[None, :]) - inter
        return (inter / union).astype(np.float32)


def tensor_max(values: np.ndarray) -> float:
    """``tensor.max().item()``: the max as a Python float, NaN if any element is NaN."""
    return float(np.max(values))


# ------------------------------------------------------ dense-captioning evaluator

def densevid_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """IoU of the dense-captioning evaluator (``DVCEval.iou``), float64.

    ``inter = max(0, min(e1, e2) - max(s1, s2))``; ``union = min(max(e1, e2) - min(s1, s2),
    (e2 - s2) + (e1 - s1))``; ``inter / (union + 1e-8)``. Reversed intervals are used as
    given (the D²VLM script's evidence intervals are not reordered).
    """
    start_i, end_i = first[0], first[1]
    start, end = second[0], second[1]
    intersection = max(0, min(end, end_i) - max(start, start_i))
    union = min(max(end, end_i) - min(start, start_i), end - start + end_i - start_i)
    return float(intersection) / (union + 1e-8)


def timechat_densevid_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """IoU of TimeChat's densevid evaluator (the authors' YouCook2 ``eval_in_timechat_format``).

    Unlike :func:`densevid_iou`, each interval is re-ordered first (``float(min(*x))``,
    ``float(max(*x))``); then ``inter / (min(hull, len_1 + len_2) + 1e-8)``.
    """
    start_1, end_1 = float(min(*first)), float(max(*first))
    start_2, end_2 = float(min(*second)), float(max(*second))
    intersection = max(0, min(end_1, end_2) - max(start_1, start_2))
    union = min(max(end_1, end_2) - min(start_1, start_2), end_1 - start_1 + end_2 - start_2)
    return float(intersection) / (union + 1e-8)


def timechat_grounding_iou(gt: Sequence[float], pred: Sequence[float]) -> float:
    """IoU of TimeChat's grounding eval (the authors' Charades-STA ``eval_in_timechat_format``).

    ``max(min(g1, p1) - max(g0, p0), 0) / (max(g1, p1) - min(g0, p0))``: no epsilon, a
    reversed prediction is not re-ordered, and 0/0 raises ZeroDivisionError as there.
    """
    max0, min0 = max(gt[0], pred[0]), min(gt[0], pred[0])
    max1, min1 = max(gt[1], pred[1]), min(gt[1], pred[1])
    return max(min1 - max0, 0) / (max1 - min0)


# ---------------------------------------------------------------- seconds <-> frames

def frame_interval_to_seconds(first: int, last: int, fps: float = 1.0,
                              frame_times: Sequence[float] | None = None) -> Interval:
    """Inclusive frame interval ``[first, last]`` -> ``(start, end)`` in seconds.

    With ``frame_times`` (float[N], the timestamp of every sampled frame, as in the batch's
    ``frame_times``) the ends are the timestamps of the two frames; else ``index / fps``.
    This is how inference renders an ``<evi>``: a one-frame interval becomes a zero-length
    interval, whose IoU with anything is 0 (as in the authors' pipeline).
    """
    if first > last:
        raise ValueError(f"frame_interval_to_seconds: first {first} > last {last}")
    if frame_times is not None:
        return float(frame_times[first]), float(frame_times[last])
    return first / fps, last / fps


def seconds_to_frame_interval(start: float, end: float, num_frames: int,
                              fps: float = 1.0) -> tuple[int, int]:
    """``(start, end)`` seconds -> inclusive frame interval (SPEC §2.2).

    Frame = ``round(seconds * fps)`` (round half to even, like Python's ``round``), clipped
    to ``[0, num_frames - 1]``; reversed intervals are swapped.
    """
    if num_frames < 1:
        raise ValueError(f"seconds_to_frame_interval: num_frames must be >= 1, got {num_frames}")
    first, last = (round(t * fps) for t in (start, end))
    first, last = (min(max(x, 0), num_frames - 1) for x in (first, last))
    return (first, last) if first <= last else (last, first)
