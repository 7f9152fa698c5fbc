"""Evidence plot without a plotting library: numpy drawing + a minimal PNG writer.

:func:`evidence_figure` draws, over a strip of frame thumbnails, one panel per generated
``<evi>`` with its grounding curve ``p_t`` (SPEC §5.2), the relative threshold
``0.6 * max p`` (SPEC §5.3, dashed) and the chosen interval (shaded, also marked under the
thumbnails); :func:`write_png` stores an RGB image (zlib + the PNG chunk layout, no
dependency). Text uses a built-in 3x5 pixel font (lowercase, digits, a little punctuation).
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np

# 3x5 glyphs, rows top to bottom, '#' = ink
_GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    "a": [".#.", "#.#", "###", "#.#", "#.#"], "b": ["##.", "#.#", "##.", "#.#", "##."],
    "c": [".##", "#..", "#..", "#..", ".##"], "d": ["##.", "#.#", "#.#", "#.#", "##."],
    "e": ["###", "#..", "##.", "#..", "###"], "f": ["###", "#..", "##.", "#..", "#.."],
    "g": [".##", "#..", "#.#", "#.#", ".##"], "h": ["#.#", "#.#", "###", "#.#", "#.#"],
    "i": ["###", ".#.", ".#.", ".#.", "###"], "j": ["..#", "..#", "..#", "#.#", ".#."],
    "k": ["#.#", "#.#", "##.", "#.#", "#.#"], "l": ["#..", "#..", "#..", "#..", "###"],
    "m": ["#.#", "###", "###", "#.#", "#.#"], "n": ["##.", "#.#", "#.#", "#.#", "#.#"],
    "o": [".#.", "#.#", "#.#", "#.#", ".#."], "p": ["##.", "#.#", "##.", "#..", "#.."],
    "q": [".#.", "#.#", "#.#", "##.", ".##"], "r": ["##.", "#.#", "##.", "#.#", "#.#"],
    "s": [".##", "#..", ".#.", "..#", "##."], "t": ["###", ".#.", ".#.", ".#.", ".#."],
    "u": ["#.#", "#.#", "#.#", "#.#", "###"], "v": ["#.#", "#.#", "#.#", "#.#", ".#."],
    "w": ["#.#", "#.#", "###", "###", "#.#"], "x": ["#.#", "#.#", ".#.", "#.#", "#.#"],
    "y": ["#.#", "#.#", ".#.", ".#.", ".#."], "z": ["###", "..#", ".#.", "#..", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    ":": ["...", ".#.", "...", ".#.", "..."], "(": ["..#", ".#.", ".#.", ".#.", "..#"],
    ")": ["#..", ".#.", ".#.", ".#.", "#.."], "<": ["..#", ".#.", "#..", ".#.", "..#"],
    ">": ["#..", ".#.", "..#", ".#.", "#.."], "/": ["..#", "..#", ".#.", "#..", "#.."],
    "=": ["...", "###", "...", "###", "..."], "_": ["...", "...", "...", "...", "###"],
    "#": ["#.#", "###", "#.#", "###", "#.#"], "'": [".#.", ".#.", "...", "...", "..."],
    "?": ["###", "..#", ".##", "...", ".#."], ",": ["...", "...", "...", ".#.", "#.."],
    " ": ["...", "...", "...", "...", "..."],
}
_GLYPH_ARRAYS = {c: np.array([[ch == "#" for ch in row] for row in rows]) for c, rows in _GLYPHS.items()}

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GRAY = (150, 150, 150)
LIGHT_GRAY = (225, 225, 225)
CURVE = (31, 119, 180)
SHADE = (255, 214, 160)
MARK = (230, 110, 0)


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale


def draw_text(image: np.ndarray, text: str, x: int, y: int, color=BLACK, scale: int = 2) -> None:
    """Writes ``text`` (lowercased; unknown characters as '?') with its top-left at (x, y)."""
    for k, ch in enumerate(text.lower()):
        glyph = _GLYPH_ARRAYS.get(ch, _GLYPH_ARRAYS["?"])
        big = np.kron(glyph, np.ones((scale, scale), bool))
        x0 = x + k * 4 * scale
        h, w = big.shape
        region = image[y:y + h, x0:x0 + w]
        if region.shape[:2] != big.shape:
            big = big[:region.shape[0], :region.shape[1]]
        region[big] = color


def _fill(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    image[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = color


def _line(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, thickness: int = 2) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, steps)).astype(int)
    ys = np.rint(np.linspace(y0, y1, steps)).astype(int)
    h, w = image.shape[:2]
    for dx in range(thickness):
        for dy in range(thickness):
            xx, yy = np.clip(xs + dx - thickness // 2, 0, w - 1), np.clip(ys + dy - thickness // 2, 0, h - 1)
            image[yy, xx] = color


def _resize_nearest(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * frame.shape[0] / height).astype(int)
    cols = (np.arange(width) * frame.shape[1] / width).astype(int)
    return frame[rows][:, cols]


def evidence_figure(frames: np.ndarray, frame_times: Sequence[float], curves: Sequence[np.ndarray | None],
                    intervals: Sequence[tuple[int, int]], labels: Sequence[str], *, title: str = "",
                    threshold: float = 0.6, panel_height: int = 110, max_width: int = 1200) -> np.ndarray:
    """The evidence plot as uint8[H, W, 3].

    Args:
      frames: uint8[N, S, S, 3] sampled frames; frame_times: float[N] seconds.
      curves: per ``<evi>``: float[N] grounding probabilities (None: not recorded).
      intervals: per ``<evi>``: ``(first, last)`` chosen frames (inclusive).
      labels: per ``<evi>``: the panel's caption.
      threshold: relative threshold drawn as ``threshold * max p``.
    """
    n = int(frames.shape[0])
    if n == 0:
        raise ValueError("evidence_figure: no frames")
    if not (len(curves) == len(intervals) == len(labels)):
        raise ValueError(f"evidence_figure: {len(curves)} curves, {len(intervals)} intervals, {len(labels)} labels")
    left, right, top = 44, 16, 30
    cell = max(2, min(64, max_width // n))
    plot_w = cell * n
    num_thumbs = max(1, min(n, plot_w // 40))
    thumb_w = plot_w // num_thumbs
    thumb_h = min(thumb_w, 64)
    strip_h = thumb_h + 8
    axis_h = 26
    panels = max(len(curves), 1)
    height = top + strip_h + panels * (panel_height + 26) + axis_h
    width = left + plot_w + right
    image = np.full((height, width, 3), WHITE, np.uint8)
    draw_text(image, title[: (width - 8) // 8], 6, 8)

    def x_of(frame_pos: float) -> float:        # left edge of frame slot ``frame_pos``
        return left + frame_pos * cell

    # thumbnails: evenly spaced frames, each under its own slot range
    for k in range(num_thumbs):
        idx = min(n - 1, int((k + 0.5) * n / num_thumbs))
        x0 = left + k * thumb_w
        image[top:top + thumb_h, x0:x0 + thumb_w - 2] = _resize_nearest(frames[idx], thumb_h, thumb_w - 2)
    for first, last in intervals:      # chosen intervals under the strip
        if first >= 0:
            _fill(image, int(x_of(first)), top + thumb_h + 2, int(x_of(last + 1)), top + thumb_h + 6, MARK)

    y = top + strip_h
    for curve, (first, last), label in zip(curves, intervals, labels):
        y0, y1 = y + 22, y + 22 + panel_height
        draw_text(image, label[: (width - 8) // 8], left, y + 4)
        _fill(image, left, y0, left + plot_w, y1, (248, 248, 248))
        if first >= 0:
            _fill(image, int(x_of(first)), y0, int(x_of(last + 1)), y1, SHADE)
        for frac in (0.0, 0.5, 1.0):   # grid + y labels
            gy = int(y1 - frac * (panel_height - 1))
            _fill(image, left, gy, left + plot_w, gy + 1, LIGHT_GRAY)
            draw_text(image, f"{frac:.1f}", 6, gy - 5)
        if curve is not None:
            p = np.clip(np.asarray(curve, np.float64)[:n], 0.0, 1.0)
            ty = y1 - threshold * p.max() * (panel_height - 1)
            for xs in range(left, left + plot_w, 8):   # dashed threshold line
                _fill(image, xs, int(ty), min(xs + 4, left + plot_w), int(ty) + 1, GRAY)
            xs = [x_of(i + 0.5) for i in range(n)]
            ys = [y1 - v * (panel_height - 1) for v in p]
            for i in range(n - 1):
                _line(image, xs[i], ys[i], xs[i + 1], ys[i + 1], CURVE)
            for xi, yi in zip(xs, ys):
                _fill(image, int(xi) - 2, int(yi) - 2, int(xi) + 3, int(yi) + 3, CURVE)
        else:
            draw_text(image, "no probabilities recorded", left + 8, y0 + 8, GRAY)
        y = y1 + 4
    if not curves:
        draw_text(image, "the answer has no <evi> token", left + 8, y + 30, GRAY)
        y += panel_height + 26

    # time axis: ticks at a few frames with their seconds
    step = max(1, int(np.ceil(n / max(1, plot_w // 56))))
    for i in range(0, n, step):
        xc = int(x_of(i + 0.5))
        _fill(image, xc, y, xc + 1, y + 4, BLACK)
        label = f"{float(frame_times[i]):g}"
        draw_text(image, label, max(0, xc - text_width(label) // 2), y + 7)
    draw_text(image, "s", left + plot_w + 4, y + 7)
    return image


def encode_png(image: np.ndarray) -> bytes:
    """uint8[H, W, 3] RGB -> PNG bytes (8-bit truecolor, filter 0, zlib)."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png: expected uint8[H, W, 3], got {image.shape}")
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: str, image: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(encode_png(image))
