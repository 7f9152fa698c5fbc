"""Parsing a model's rendered response back into intervals, captions and choices.

At inference (SPEC §5.4) the response is rendered as text in which every ``<evi>`` became
``"{start} - {end}"`` in seconds, e.g.::

    "12.0 - 15.5, 20.0 - 22.0</evi> The man opens the fridge at 12.0 - 15.5 and ..."

The grounding stage (before ``</evi>``) and the answer stage (after it) are separated by
:func:`split_response`; the metrics read the answer stage, like the authors' modified
E.T. Bench script (delimiter ``</evi>``). A response without ``</evi>`` is all answer
(E.T. Chat-style output).

The patterns follow E.T. Bench's ``compute_metrics.py`` where our renderer can produce the
text: ``a - b`` intervals, then ``a to b`` as a fallback. Its further heuristics for free
text of other models (a lone number widened by ±20 s, ``mm:ss`` clock times, "start time:"
phrases) are deliberately not reproduced: our model never writes them, and a response that
needs them is counted as unparseable instead of being scored on a guess.

Nothing here raises on model output: a response that cannot be parsed gives ``None`` or an
empty list, and the metrics count it as a miss (``num_unparseable``).
"""

from __future__ import annotations

import re

EVIDENCE_END = "</evi>"

_NUMBER = r"\d+(?:\.\d+)?"
_INTERVAL_PATTERN = re.compile(rf"({_NUMBER})\s*-\s*({_NUMBER})")
_TO_PATTERN = re.compile(rf"({_NUMBER})\s+to\s+({_NUMBER})", re.IGNORECASE)
_SINGLE_NUMBER_PATTERN = re.compile(rf"(?<![\d.]){_NUMBER}")
_PARENTHESIZED_LETTER = re.compile(r"\(([A-Za-z])\)")
_CHOICE_SEPARATORS = (".", ",", " ", ")", ":")
_CAPTION_EDGE = " \t\n,.;:"

Interval = tuple[float, float]


def render_interval(start: float, end: float, decimals: int = 1) -> str:
    """Renders an interval in seconds the way inference writes an ``<evi>`` (SPEC §5.4)."""
    return f"{start:.{decimals}f} - {end:.{decimals}f}"


def split_response(response: str) -> tuple[str | None, str]:
    """Splits a rendered response into (grounding stage, answer stage).

    The answer is the text after the last ``</evi>``; the grounding stage is the text before
    the first one (None when the response has no ``</evi>``: then it is all answer).
    """
    if EVIDENCE_END not in response:
        return None, response
    grounding = response.split(EVIDENCE_END, 1)[0]
    answer = response.rsplit(EVIDENCE_END, 1)[1]
    return grounding, answer


def _ordered(start: float, end: float) -> Interval:
    return (start, end) if start <= end else (end, start)


def parse_intervals(text: str) -> list[Interval]:
    """All intervals ``"a - b"`` (else ``"a to b"``) in order of appearance, in seconds.

    Reversed pairs are swapped (E.T. Bench does the same). Returns [] when there is none.
    """
    matches = _INTERVAL_PATTERN.findall(text)
    if not matches:
        matches = _TO_PATTERN.findall(text)
    return [_ordered(float(a), float(b)) for a, b in matches]


def parse_first_interval(text: str) -> Interval | None:
    """The first interval of :func:`parse_intervals`, or None."""
    intervals = parse_intervals(text)
    return intervals[0] if intervals else None


def parse_point(text: str) -> float | None:
    """A timestamp for highlight detection (VHD), in seconds.

    The midpoint of the first interval (SPEC §6, as in the authors' modified script); when
    the text holds no interval, the first number in it (E.T. Bench's official rule).
    """
    interval = parse_first_interval(text)
    if interval is not None:
        return 0.5 * (interval[0] + interval[1])
    match = _SINGLE_NUMBER_PATTERN.search(text)
    return float(match.group(0)) if match else None


def parse_dense_captions(text: str) -> list[tuple[Interval, str]]:
    """Splits a dense-captioning answer into ``(interval, caption)`` pairs.

    Mirrors E.T. Bench's pairing: the text is cut at every interval, the word "seconds" is
    dropped, chunks of at most 5 characters (separators such as ``", "``) are discarded,
    the rest are stripped of spaces and ``, . ; :`` at both ends (official: spaces and
    commas) and paired with the intervals in order; extra intervals or
    captions are dropped. Works for "interval, caption." and "caption at interval."
    layouts alike, as long as no long preamble precedes the first event.
    """
    pattern = _INTERVAL_PATTERN if _INTERVAL_PATTERN.search(text) else _TO_PATTERN
    matches = list(pattern.finditer(text))
    if not matches:
        return []
    intervals = [_ordered(float(m.group(1)), float(m.group(2))) for m in matches]
    cut_points = [0] + [p for m in matches for p in (m.start(), m.end())] + [len(text)]
    chunks = [text[cut_points[i]:cut_points[i + 1]] for i in range(0, len(cut_points), 2)]
    captions = []
    for chunk in chunks:
        chunk = chunk.replace("seconds", "")
        if len(chunk) > 5:
            captions.append(chunk.strip(_CAPTION_EDGE))
    captions = [c for c in captions if c]
    count = min(len(intervals), len(captions))
    return list(zip(intervals[:count], captions[:count]))


def parse_choice(text: str, num_options: int) -> int | None:
    """The option index (0 = A) a multiple-choice answer picks, or None.

    Same order of rules as E.T. Bench: a parenthesized letter ``(B)`` anywhere; else, after
    dropping a leading "best option:" and "(", a first character that is a letter standing
    alone or followed by one of ``. , ) :`` or a space. Letters beyond ``num_options`` do not
    count.
    """
    if num_options < 1:
        raise ValueError(f"parse_choice: num_options must be >= 1, got {num_options}")
    match = _PARENTHESIZED_LETTER.search(text)
    if match:
        index = ord(match.group(1).lower()) - ord("a")
        if 0 <= index < num_options:
            return index
    stripped = text.strip().lower()
    if stripped.startswith("best option:"):
        stripped = stripped[len("best option:"):]
    stripped = stripped.lstrip().lstrip("(").lstrip()
    if not stripped:
        return None
    if len(stripped) == 1 or stripped[1] in _CHOICE_SEPARATORS:
        index = ord(stripped[0]) - ord("a")
        if 0 <= index < num_options:
            return index
    return None
