"""The authors' rules for reading timestamps and captions out of a raw answer text.

The D²VLM authors score Charades-STA and YouCook2 (``all_benchmark_eval/*/
convert_result_in_timechat_format.py``) and E.T. Bench (``new_compute_metrics.py``) with
one family of hand-written parsers. This module re-implements those parsers rule for rule,
quirks included, so that every protocol built on them reads an answer exactly as the
authors' script does:

* :func:`grounding_intervals` (their ``tvg_format``): lower-cases the answer, splits it at
  the delimiter (``</evi>``) into a grounding stage (text before the first delimiter) and an
  answer stage (text after the last one); answer intervals come from ``a - b``, then
  ``a to b``, then the first number of each sentence with a timing keyword, paired up; the
  answer intervals are put in order, the grounding-stage ones are not.
* :func:`paragraph_events` (their ``extract_time_from_paragraph``): dense captions, each
  ``a - b`` interval paired with the text *piece before it* (a piece is kept only when it
  has more than 5 characters), then ``start time: / end time:`` phrases.
* :func:`widened_time_part` (their ``extract_time_part``): one clock time ``m:ss`` or one
  number becomes a 40 s window (±20 s, or ``[t, t + 40]`` when ``t <= 20``), two clock
  times or two numbers an interval.
* :func:`dense_events` (their ``dvc_format``): the YouCook2 converter's combination of the
  two above, with its fallback over lines or sentences of the *whole* answer (grounding
  stage included) that keeps only the first usable one.

The numbers are matched with the authors' patterns (``\\d`` is any Unicode decimal digit, as
in their Python) and converted with Python's ``float``/``int``; a conversion their code does
not guard (``float('1..5')``) raises :class:`AuthorsParseError` here as it raises there, and
the caller decides (their Charades converter stops on it; their YouCook2 converter catches
it). Interval values are plain Python floats, so IoUs computed from them are bit-identical
to the authors'.
"""

from __future__ import annotations

import dataclasses
import re

DELIMITERS = {"v2": "Answer: ", "v3": "</evi>", "v4": ""}
DEFAULT_DELIMITER = DELIMITERS["v3"]

# ``a - b`` with the authors' loose number pattern (several dots allowed inside a number).
_DASH_INTERVAL = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_DASH_INTERVAL_TEXT = re.compile(r"(\d+\.*\d*\s*-\s*\d+\.*\d*)")
_TO_INTERVAL = re.compile(r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)")
_FIRST_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_SENTENCE_BREAK = re.compile(r"[!?\n]")
_TIMING_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end",
                    "happen")
_DOT_RUN = re.compile(r"\.{2,}")
_START_PHRASE = re.compile(r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)",
                           re.DOTALL | re.IGNORECASE)
_END_PHRASE = re.compile(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)",
                         re.DOTALL | re.IGNORECASE)
_DESCRIPTION = re.compile(r"description: (.*)")
_BULLET = re.compile(r"\*\s*(.*)")
_START_END_COMMA = re.compile(r"start time (\d+\.*\d*), end time (\d+\.*\d*)")
_CLOCK = re.compile(r"\d+\.*\d*:\d+\.*\d*")
_LOOSE_NUMBER = re.compile(r"\d+\.*\d*(?!\.)")

WIDEN_RADIUS = 20

Interval = list  # [start, end], Python floats (ints where the authors' code makes ints)


class AuthorsParseError(ValueError):
    """A conversion the authors' parser does not guard failed (their script raises too)."""


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise AuthorsParseError(f"float({text!r}) fails") from error


def _dash_intervals(text: str, strip_trailing_dots: bool) -> list[Interval]:
    if strip_trailing_dots:
        return [[_to_float(a.rstrip(".")), _to_float(b.rstrip("."))]
                for a, b in _DASH_INTERVAL.findall(text)]
    return [[_to_float(a), _to_float(b)] for a, b in _DASH_INTERVAL.findall(text)]


def grounding_intervals(answer: str, delimiter: str = DEFAULT_DELIMITER, *,
                        strip_trailing_dots: bool = False
                        ) -> tuple[list[Interval] | None, list[Interval] | None]:
    """The answer-stage and grounding-stage intervals of one answer (their ``tvg_format``).

    Args:
      answer: the raw answer text ``a``.
      delimiter: the stage delimiter (``</evi>``); matched case-insensitively.
      strip_trailing_dots: strip trailing dots before ``float`` (``new_compute_metrics.py``
        does, the TimeChat-format Charades converter does not and fails on ``"12.. - 15"``).

    Returns:
      ``(answer_intervals, grounding_intervals)``, each a non-empty list of ``[start, end]``
      or None. Both are None when the answer has no delimiter. Answer intervals are ordered
      (``[min, max]``); grounding intervals are kept as written.

    Raises:
      AuthorsParseError: a matched number is not a float (``1..5``), as in their code.
    """
    answer = answer.lower()
    stages = answer.split(delimiter.lower())
    if len(stages) < 2:
        return None, None
    grounding, answer = stages[0], stages[-1]
    sentences = _SENTENCE_BREAK.split(answer)
    candidates = [s for s in sentences if any(k in s for k in _TIMING_KEYWORDS)]

    intervals = _dash_intervals(answer, strip_trailing_dots)
    evidence = _dash_intervals(grounding, strip_trailing_dots)
    if not intervals:
        intervals = [[_to_float(a), _to_float(b)] for a, b in _TO_INTERVAL.findall(answer)]
    if not intervals:
        # The first number of every keyword sentence, paired in order. (Their next fallback,
        # hh:mm:ss clock times, can never produce a pair: a sentence with a clock time also
        # has a first number here, so this step already saw at most one such sentence.)
        times = []
        for sentence in candidates:
            found = _FIRST_NUMBER.findall(sentence)
            if found:
                times.append(_to_float(found[0]))
        intervals = [[times[i], times[i + 1]] for i in range(0, len(times) // 2 * 2, 2)]
    ordered = [[s, e] if e > s else [e, s] for s, e in intervals]
    return (ordered or None), ([[s, e] for s, e in evidence] or None)


@dataclasses.dataclass
class ParagraphEvents:
    """Events read off one paragraph by :func:`paragraph_events`."""

    timestamps: list[Interval]
    captions: list[str] | None  # None in evidence mode


def paragraph_events(paragraph: str, *, with_captions: bool) -> ParagraphEvents:
    """Dense events of one paragraph (their ``extract_time_from_paragraph``).

    The paragraph is lower-cased and every run of 2+ dots becomes a space. Each ``a - b``
    match gives an interval; the captions are the pieces left after cutting the text at
    every matched interval string (``str.replace``, so a match also cuts inside a longer
    number such as ``11 - 22`` for ``1 - 2``) with ``seconds`` removed; pieces of at most
    5 characters are dropped, the rest stripped, and intervals and captions are paired by
    position and truncated to the shorter list. Without ``a - b``: ``start time: x`` /
    ``end time: y`` phrases paired in order, captions from ``description: ...`` lines or
    else ``* ...`` bullets.

    Args:
      paragraph: one stage of an answer.
      with_captions: the authors' ``mode='answer'`` (True) or ``'evidence'`` (False: only
        the ``a - b`` intervals, no captions, no fallbacks).

    Raises:
      AuthorsParseError: the text has ``start time x, end time y`` (their assertion fails).
    """
    paragraph = _DOT_RUN.sub(" ", paragraph.lower())
    timestamps: list[Interval] = []
    captions: list[str] = []
    matches = _DASH_INTERVAL.findall(paragraph)
    if matches:
        timestamps = [[_to_float(a), _to_float(b)] for a, b in matches]
        rest = paragraph
        for text in _DASH_INTERVAL_TEXT.findall(paragraph):
            rest = rest.replace(text, "\n")
        captions = rest.replace("seconds", "").split("\n")
    if not with_captions:
        return ParagraphEvents(timestamps, None)

    if not timestamps:
        starts = _START_PHRASE.findall(paragraph)
        ends = _END_PHRASE.findall(paragraph)
        if starts and ends:
            timestamps = [[_to_float(s), _to_float(e)] for s, e in zip(starts, ends)]
            captions = _DESCRIPTION.findall(paragraph) or _BULLET.findall(paragraph)
    if not timestamps and _START_END_COMMA.findall(paragraph):
        raise AuthorsParseError("'start time x, end time y' phrase (their assertion fails)")

    captions = [c.strip().strip(", ").rstrip() for c in captions if len(c) > 5]
    keep = min(len(timestamps), len(captions))
    return ParagraphEvents(timestamps[:keep], captions[:keep])


def widened_time_part(text: str) -> list[str]:
    """Interval strings of a piece of text (their ``extract_time_part``).

    ``a - b`` matches are returned as written; otherwise one ``m:ss`` clock time becomes a
    window of ±20 s (``[t, t + 40]`` when ``t <= 20``), two clock times an interval (only
    when the text has exactly one or two ``:``); otherwise the loose numbers of the text:
    one is widened like a clock time, two make an interval, three or more are returned as
    they are (the caller then fails to split them).

    Raises:
      AuthorsParseError: a clock time that ``int`` cannot read, or not the expected number
        of clock times (their code raises; the caller catches it).
    """
    found = _DASH_INTERVAL_TEXT.findall(text)
    if not found:
        colons = text.count(":")
        if colons in (1, 2):
            clocks = _CLOCK.findall(text)
            try:
                if colons == 1:
                    t = _clock_seconds(clocks[0])
                    found = [_widen(t)]
                else:
                    start, end = clocks  # exactly two, else their unpacking fails
                    found = [f"{_clock_seconds(start)} - {_clock_seconds(end)}"]
            except (IndexError, ValueError) as error:
                raise AuthorsParseError(f"clock time in {text!r}: {error}") from error
    if not found:
        found = _LOOSE_NUMBER.findall(text)
        if len(found) == 1:
            found = [_widen(_to_float(found[0]))]
        elif len(found) == 2:
            found = [f"{found[0]} - {found[1]}"]
    return found


def _clock_seconds(clock: str) -> int:
    minutes, seconds = clock.split(":")[0], clock.split(":")[1]
    return int(minutes) * 60 + int(seconds)


def _widen(t: int | float) -> str:
    if t > WIDEN_RADIUS:
        return f"{t - WIDEN_RADIUS} - {t + WIDEN_RADIUS}"
    return f"{t} - {t + 2 * WIDEN_RADIUS}"


@dataclasses.dataclass
class DenseParse:
    """The result of :func:`dense_events` for one answer.

    ``status``:
      * ``"ok"``: ``timestamps``/``captions`` are the events (ordered ``[min, max]``).
      * ``"no_delimiter"``: the answer has no delimiter; the authors write an empty list.
      * ``"no_events"``: nothing parseable; the authors' converter *stops* here (their
        ``dvc_format`` returns two values to a caller that unpacks three).
      * ``"parse_error"``: a parsing step raised; their converter stops the same way.
    """

    status: str
    timestamps: list[Interval] = dataclasses.field(default_factory=list)
    captions: list[str] = dataclasses.field(default_factory=list)
    evidence: list[Interval] = dataclasses.field(default_factory=list)
    detail: str = ""


def _caption_candidates(answer: str) -> list[str]:
    if "\n" in answer:
        return [c for c in answer.split("\n") if len(c) > 7]
    return [c + "." for c in answer.split(".") if len(c) > 7]


def _fallback_event(candidate: str) -> tuple[Interval, str] | None:
    """One event from a line/sentence: ``<time part> seconds <caption>``; None if unusable."""
    parts = [p.strip(",") for p in candidate.split("seconds")]
    try:
        found = widened_time_part(parts[0])
    except AuthorsParseError:
        return None
    if not found:
        return None
    pieces = found[0].split("-")
    try:
        start = round(float(pieces[0].strip()), 2)
        end = round(float(pieces[1].strip()), 2)
    except (IndexError, ValueError):
        return None
    return [start, end], parts[-1].strip()


def dense_events(answer: str, delimiter: str = DEFAULT_DELIMITER) -> DenseParse:
    """Dense-captioning events of one answer (their YouCook2 ``dvc_format``).

    The answer is split at ``delimiter`` (case-sensitive): captioned events come from the
    text between the first and the second delimiter (:func:`paragraph_events`), grounding
    intervals from the text before the first one. If that gives no event, the *whole* answer
    is cut into lines (if it has a newline; lines of more than 7 characters) or sentences
    (at ``.``; pieces of more than 7 characters, a ``.`` appended), and the first piece whose
    part before ``seconds`` holds a time (:func:`widened_time_part`) gives the only event,
    rounded to 2 decimals, its caption the text after the last ``seconds``.
    """
    stages = answer.split(delimiter)
    if len(stages) < 2:
        return DenseParse("no_delimiter")
    try:
        events = paragraph_events(stages[1], with_captions=True)
        evidence = paragraph_events(stages[0], with_captions=False).timestamps
    except AuthorsParseError as error:
        return DenseParse("parse_error", detail=str(error))
    timestamps, captions = events.timestamps, events.captions
    if not timestamps:
        for candidate in _caption_candidates(answer):
            event = _fallback_event(candidate)
            if event is not None:
                timestamps, captions = [event[0]], [event[1]]
                break
    if not timestamps:
        return DenseParse("no_events", evidence=evidence)
    ordered = [[min(t), max(t)] for t in timestamps]
    return DenseParse("ok", ordered, list(captions), evidence)
