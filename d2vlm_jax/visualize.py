"""The evidence plot (matplotlib, Agg backend): what the model looked at for each ``<evi>``.

Used by the launchers (``launch/infer.py --plot``, ``launch/demo.py``); nothing under
``d2vlm_jax/train`` or ``d2vlm_jax/inference`` imports it, so training never needs a
plotting library at import time.

:func:`evidence_figure` draws, under a strip of frame thumbnails placed at their times, one
panel per generated ``<evi>``: its per-frame grounding probability ``p_t`` (SPEC §5.2), the
relative threshold ``0.6 * max p`` (SPEC §5.3, dashed), the chosen interval (shaded, the
frames it spans), and the ground-truth interval when known (hatched); seconds on the x axis,
probability on the y axis, a legend. :func:`save_figure` writes PNG, SVG or PDF by the
file's extension.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Protocol, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

FORMATS = ("png", "svg", "pdf")
CURVE_COLOR = "#1f77b4"
CHOSEN_COLOR = "#ff9f40"
TRUTH_COLOR = "#2ca02c"
THRESHOLD_COLOR = "#555555"


class EvidenceLike(Protocol):
    """One generated ``<evi>`` (``inference.runner.Evidence``)."""
    frames: tuple[int, int]          # chosen [first, last] frame (inclusive)
    seconds: tuple[float, float]     # their times
    stage: str                       # "grounding" or "answer"
    probs: np.ndarray | None         # float[N] p_t over the frames (None: not recorded)


def _frame_step(frame_times: np.ndarray) -> float:
    return float(np.median(np.diff(frame_times))) if frame_times.size > 1 else 1.0


def evidence_figure(frames: np.ndarray, frame_times: Sequence[float], evidence: Sequence[EvidenceLike], *,
                    title: str = "", threshold: float = 0.6,
                    ground_truth: Sequence[tuple[float, float]] = (), max_thumbnails: int = 8,
                    max_panels: int = 6, width_inches: float = 10.0) -> Figure:
    """The evidence plot.

    Args:
      frames: uint8[N, H, W, 3] sampled frames; frame_times: float[N] their seconds.
      evidence: the generated ``<evi>`` tokens, in order (:class:`EvidenceLike`).
      title: figure title (wrapped).
      threshold: relative threshold drawn at ``threshold * max p`` in every panel.
      ground_truth: ``(start, end)`` seconds of the true events, when known (the k-th is
        drawn in the k-th grounding panel; a single one in every panel).
      max_thumbnails: frames shown in the strip (evenly spaced).
      max_panels: panels drawn at most (the first ``<evi>`` tokens; the title says so).
    Returns:
      A matplotlib ``Figure`` (close it with ``plt.close(fig)``).
    """
    frames = np.asarray(frames)
    times = np.asarray(frame_times, np.float64)
    n = int(frames.shape[0])
    if n == 0 or times.shape[0] != n:
        raise ValueError(f"evidence_figure: {n} frames but {times.shape[0]} frame times")
    step = _frame_step(times)
    if len(evidence) > max_panels:
        title = f"{title} (the first {max_panels} of {len(evidence)} <evi> tokens)".strip()
        evidence = list(evidence)[:max_panels]
    x_min, x_max = times[0] - step / 2, times[-1] + step / 2
    panels = max(len(evidence), 1)
    num_thumbs = min(n, max_thumbnails)
    thumb_height = 0.95 * width_inches * 0.86 / num_thumbs * frames.shape[1] / max(frames.shape[2], 1)
    heights = [thumb_height] + [1.9] * panels
    fig = plt.figure(figsize=(width_inches, sum(heights) + 1.3), layout="constrained")
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    strip = fig.add_subplot(grid[0])
    axes = [fig.add_subplot(grid[k + 1], sharex=strip) for k in range(panels)]

    # thumbnails at their times, each filling its share of the strip
    picks = np.unique(np.round(np.linspace(0, n - 1, num_thumbs)).astype(int))
    span = (x_max - x_min) / len(picks)
    for j, idx in enumerate(picks):
        left = x_min + j * span
        strip.imshow(frames[idx], extent=(left + 0.03 * span, left + 0.97 * span, 0, 1), aspect="auto",
                     interpolation="nearest")
        strip.annotate(f"{times[idx]:g} s", (left + span / 2, 0), xytext=(0, -2), textcoords="offset points",
                       ha="center", va="top", fontsize=8)
    strip.set_xlim(x_min, x_max)
    strip.set_ylim(0, 1)
    strip.axis("off")
    if title:
        strip.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=10, loc="left")

    truth = list(ground_truth)
    grounding_rank = 0
    for k, (ax, ev) in enumerate(zip(axes, evidence)):
        first, last = ev.frames
        ax.axvspan(times[first] - step / 2, times[last] + step / 2, color=CHOSEN_COLOR, alpha=0.35, lw=0,
                   label=f"chosen interval: frames {first}-{last} = {ev.seconds[0]:g}-{ev.seconds[1]:g} s")
        gt = None
        if ev.stage == "grounding" and grounding_rank < len(truth):
            gt = truth[grounding_rank]
        elif len(truth) == 1:
            gt = truth[0]
        grounding_rank += ev.stage == "grounding"
        if gt is not None:
            ax.axvspan(gt[0], gt[1], facecolor="none", edgecolor=TRUTH_COLOR, hatch="///", lw=1.5,
                       label=f"ground truth: {gt[0]:g}-{gt[1]:g} s")
        if ev.probs is not None:
            p = np.clip(np.asarray(ev.probs, np.float64)[:n], 0.0, 1.0)
            ax.plot(times[:p.shape[0]], p, "-o", color=CURVE_COLOR, ms=3.5, lw=1.6, label="p(frame is evidence)")
            ax.axhline(threshold * p.max(), color=THRESHOLD_COLOR, ls="--", lw=1.1,
                       label=f"threshold {threshold:g} x max p = {threshold * p.max():.2f}")
        else:
            ax.text(0.5, 0.5, "grounding probabilities not recorded", transform=ax.transAxes, ha="center",
                    color="gray")
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("probability")
        ax.set_title(f"<evi> {k + 1} ({ev.stage} stage)", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if not evidence:
        axes[0].text(0.5, 0.5, "the answer has no <evi> token: nothing was grounded", transform=axes[0].transAxes,
                     ha="center", color="gray")
        axes[0].set_yticks([])
        if truth:
            for gt in truth:
                axes[0].axvspan(gt[0], gt[1], facecolor="none", edgecolor=TRUTH_COLOR, hatch="///", lw=1.5)
            axes[0].legend(handles=[Patch(facecolor="none", edgecolor=TRUTH_COLOR, hatch="///",
                                          label="ground truth")], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                           fontsize=8, frameon=False)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("time in the video (s)")
    axes[-1].set_xlim(x_min, x_max)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 130) -> str:
    """Writes ``fig`` as PNG, SVG or PDF (by the extension of ``path``) and closes it."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        plt.close(fig)
        raise ValueError(f"plot file {path}: unknown format {ext!r}; use .png, .svg or .pdf")
    try:
        fig.savefig(path, format=ext, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def write_evidence_plot(path: str | os.PathLike, prepared: Any, result: Any, *, title: str = "",
                        threshold: float = 0.6, ground_truth: Sequence[tuple[float, float]] = ()) -> str:
    """:func:`evidence_figure` of an inference result (``runner.PreparedInput`` and
    ``runner.InferenceResult``) saved to ``path``."""
    fig = evidence_figure(prepared.frames, prepared.frame_times, result.evidence, title=title,
                          threshold=threshold, ground_truth=ground_truth)
    return save_figure(fig, path)


__all__ = ["FORMATS", "evidence_figure", "save_figure", "write_evidence_plot"]
