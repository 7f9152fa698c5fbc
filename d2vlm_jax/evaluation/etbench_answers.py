"""Answer parsing of the E.T. Bench scoring scripts, rule for rule.

The official E.T. Bench script (``compute_metrics.py``, shipped by the D²VLM authors as
``compute_metrics_original_etchat.py``) and the authors' D²VLM variant
(``new_compute_metrics.py``) read free text with the heuristics below. Every heuristic is
reproduced as the scripts execute it, quirks included (each is named in the docstrings and
in ``docs/EVALUATION.md``). These functions never guess beyond the scripts: where a script
would stop with a Python error on an answer, they raise :class:`ScriptCrash`.

Numbers are ``\\d+\\.*\\d*``: digits, any number of dots, digits -- so ``"12.."`` is a
number to the regex and a ``float()`` error to Python (a crash in the scripts).
"""

from __future__ import annotations

import re

KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
"""A sentence (text between ``! ? \\n``) holding one of these is a "candidate" sentence."""

NUMBER = r"\d+\.*\d*"
INTERVAL = re.compile(rf"({NUMBER})\s*-\s*({NUMBER})")
INTERVAL_TEXT = re.compile(rf"({NUMBER}\s*-\s*{NUMBER})")
TO_INTERVAL = re.compile(rf"({NUMBER})\s* to \s*({NUMBER})")
KEYWORD_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
FIRST_NUMBER = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")
PARENTHESIZED_LETTER = re.compile(r"\(([A-Za-z])\)")
LETTER_SEPARATORS = (".", ",", " ", ")")
RADIUS = 20


class ScriptCrash(Exception):
    """The reimplemented script would stop with a Python error on this input."""


def script_float(text: str) -> float:
    """``float(text)``; a malformed number (``"12.."``) is a crash of the script."""
    try:
        return float(text)
    except ValueError:
        raise ScriptCrash(f"float({text!r}) fails (ValueError)") from None


def _ordered(start, end) -> list:
    """``[start, end]`` if ``end > start`` else ``[end, start]`` (ties keep ``[end, start]``)."""
    return [start, end] if end > start else [end, start]


def grounding_intervals(text: str, strip_trailing_dots: bool = False) -> list[list[float]] | None:
    """The official ``tvg_format``: every interval of an answer, or None.

    Rules, in order (the first that finds something wins):

    1. every ``a - b`` in the lower-cased text (``strip_trailing_dots``: the D²VLM script
       strips trailing dots off each number first, so ``"12. - 15."`` parses);
    2. every ``a to b`` (exactly one space around ``to``);
    3. the first number (``\\b\\d+(.\\d+)?\\b``) of every candidate sentence (one holding a
       keyword such as "start" or "end"), paired up in order, an odd last one dropped;
    4. (``hh:mm:ss`` clock times in candidate sentences -- dead code in the script:
       ``re.findall`` with two groups returns tuples, whose ``count(':')`` is 0, and the
       rule only runs when step 3 found fewer than two numbers, so it never adds a pair.)

    Each pair is ordered (``[min, max]``). Values are Python floats.
    """
    text = text.lower()
    sentences = re.split(r"[!?\n]", text)
    candidates = [s for s in sentences if any(k in s for k in KEYWORDS)]

    def number(s: str) -> float:
        return script_float(s.rstrip(".") if strip_trailing_dots else s)

    pairs: list = [[number(a), number(b)] for a, b in INTERVAL.findall(text)]
    if not pairs:
        pairs = [[script_float(a), script_float(b)] for a, b in TO_INTERVAL.findall(text)]
    if not pairs:
        times = []
        for sentence in candidates:
            found = KEYWORD_NUMBER.findall(sentence)
            if found:
                times.append(float(found[0]))
        times = times[:len(times) // 2 * 2]
        pairs = [(times[i], times[i + 1]) for i in range(0, len(times), 2)]
    results = [_ordered(start, end) for start, end in pairs]
    return results or None


def split_at_delimiter(answer: str, delimiter: str) -> tuple[str, str] | None:
    """D²VLM script: ``(grounding stage, answer)`` = first and last piece of
    ``answer.split(delimiter)``; None when the delimiter is absent."""
    if not delimiter:
        raise ValueError("the delimiter must not be empty (the script's 'v4' = '' crashes "
                         "in str.split)")
    pieces = answer.split(delimiter)
    if len(pieces) < 2:
        return None
    return pieces[0], pieces[-1]


def d2vlm_grounding_intervals(answer: str, delimiter: str, strip_trailing_dots: bool = True
                              ) -> tuple[list[list[float]] | None, list[list[float]] | None]:
    """The D²VLM script's ``tvg_format(ans, delimiter)``: ``(answer intervals, evidence intervals)``.

    The text is lower-cased (delimiter too) and split at the delimiter: no delimiter gives
    ``(None, None)`` -- a failed sample. The answer part is parsed by
    :func:`grounding_intervals` with trailing dots stripped (``strip_trailing_dots=False``:
    the TimeChat-format Charades converter's copy, which does not strip them and so fails on
    ``"12.. - 15"``); the grounding-stage part yields its ``a - b`` pairs only, as written
    (not reordered, no other rule, no dot stripping).
    """
    parts = split_at_delimiter(answer.lower(), delimiter.lower())
    if parts is None:
        return None, None
    evidence_text, answer_text = parts
    evidence = [[script_float(a), script_float(b)] for a, b in INTERVAL.findall(evidence_text)]
    return (grounding_intervals(answer_text, strip_trailing_dots=strip_trailing_dots),
            evidence or None)


def first_number(text: str) -> float | None:
    """The official VHD rule: the first number in the answer, sign included, or None."""
    match = FIRST_NUMBER.search(text)
    return float(match.group(0)) if match else None


# ------------------------------------------------------------------- dense captions

class _ParagraphError(Exception):
    """``extract_time_from_paragraph`` raised (a ``float()`` error or its assertion)."""


def _time_part(text: str) -> list[str]:
    """``extract_time_part``: the interval strings of a sentence's time part.

    ``a - b`` strings; else one ``m:ss`` (-> a 40 s window around it: ``t-20 - t+20``, or
    ``t - t+40`` when t <= 20) or two ``m:ss`` (-> their interval), by the number of colons;
    else the numbers (``\\d+\\.*\\d*`` not followed by a dot): one -> the same 40 s window,
    two -> their interval, more -> the numbers themselves (the caller then fails on them).
    ValueError / IndexError propagate (the caller skips the sentence).
    """
    found = re.findall(rf"{NUMBER}\s*-\s*{NUMBER}", text)
    if not found:
        colons = text.count(":")
        if colons == 1:
            clock = re.findall(rf"{NUMBER}:{NUMBER}", text)[0]
            seconds = int(clock.split(":")[0]) * 60 + int(clock.split(":")[1])
            found = ([f"{seconds - RADIUS} - {seconds + RADIUS}"] if seconds > RADIUS
                     else [f"{seconds} - {seconds + 2 * RADIUS}"])
        elif colons == 2:
            start, end = re.findall(rf"{NUMBER}:{NUMBER}", text)
            start_s = int(start.split(":")[0]) * 60 + int(start.split(":")[1])
            end_s = int(end.split(":")[0]) * 60 + int(end.split(":")[1])
            found = [f"{start_s} - {end_s}"]
    if not found:
        found = re.findall(rf"{NUMBER}(?!\.)", text)
        if len(found) == 1:
            t = float(found[0])
            found = ([f"{t - RADIUS} - {t + RADIUS}"] if t > RADIUS
                     else [f"{t} - {t + 2 * RADIUS}"])
        elif len(found) == 2:
            found = [f"{found[0]} - {found[1]}"]
    return found


def _paragraph_events(paragraph: str, collapse_dots: bool) -> tuple[list, list]:
    """``extract_time_from_paragraph`` (answer mode): ``(timestamps, captions)``.

    Lower-cased (D²VLM: runs of 2+ dots become a space first). ``a - b`` pairs, the text
    cut at every occurrence of each matched interval string (``str.replace``, so a string
    also cuts inside a longer number: ``"1 - 2"`` cuts ``"11 - 23"``), "seconds" removed,
    split into chunks; else ``start time: x`` / ``end time: y`` pairs with ``description:``
    or ``* `` lines; a ``start time x, end time y`` phrase trips the script's assertion.
    Chunks longer than 5 characters are kept, stripped (spaces, then ``", "``), and the
    two lists are truncated to the shorter one.
    """
    paragraph = paragraph.lower()
    if collapse_dots:
        paragraph = re.sub(r"\.{2,}", " ", paragraph)
    timestamps: list = []
    captions: list = []
    try:
        matches = INTERVAL.findall(paragraph)
        if matches:
            timestamps = [[float(a), float(b)] for a, b in matches]
            rest = paragraph
            for interval_text in INTERVAL_TEXT.findall(paragraph):
                rest = rest.replace(interval_text, "\n")
            captions = rest.replace("seconds", "").split("\n")
        if not timestamps:
            flags = re.DOTALL | re.IGNORECASE
            ends = re.findall(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", paragraph, flags)
            starts = re.findall(r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", paragraph,
                                flags)
            if starts and ends:
                timestamps = [[float(a), float(b)] for a, b in zip(starts, ends)]
                captions = re.findall(r"description: (.*)", paragraph)
                if not captions:
                    captions = re.findall(r"\*\s*(.*)", paragraph)
        if not timestamps and re.findall(r"start time (\d+\.*\d*), end time (\d+\.*\d*)",
                                         paragraph):
            raise _ParagraphError("'start time x, end time y' trips the script's assertion")
    except ValueError as error:
        raise _ParagraphError(str(error)) from None
    captions = [c.strip().strip(", ").rstrip() for c in captions if len(c) > 5]
    count = min(len(timestamps), len(captions))
    return timestamps[:count], captions[:count]


def _fallback_events(text: str) -> tuple[list, list]:
    """``dvc_format``'s fallback for answers without intervals: the FIRST sentence (lines if
    the text has a newline, else ``.``-sentences with the dot put back; longer than 7
    characters) whose time part (before "seconds") :func:`_time_part` can read. The caption
    is the part after the last "seconds" (the whole sentence when it has none)."""
    if "\n" in text:
        sentences = [c for c in text.split("\n") if len(c) > 7]
    else:
        sentences = [c + "." for c in text.split(".") if len(c) > 7]
    for sentence in sentences:
        try:
            parts = [p.strip(",") for p in sentence.split("seconds")]
            found = _time_part(parts[0])
            if not found:
                continue
            time_text = found[0]
            start = round(float(time_text.split("-")[0].strip()), 2)
            end = round(float(time_text.split("-")[1].strip()), 2)
        except (ValueError, IndexError):
            continue
        return [[start, end]], [parts[-1].strip()]
    return [], []


def dense_captions(answer: str) -> tuple[list[list[float]], list[str]] | None:
    """The official ``dvc_format``: ``(timestamps, captions)`` with ordered intervals, or None.

    None (a failed sample) when nothing is found or when the paragraph parser raises.
    """
    try:
        timestamps, captions = _paragraph_events(answer, collapse_dots=False)
    except _ParagraphError:
        return None
    if not timestamps:
        timestamps, captions = _fallback_events(answer)
    if not timestamps:
        return None
    return [[min(t), max(t)] for t in timestamps], captions


def d2vlm_dense_captions(answer: str, delimiter: str):
    """The D²VLM script's ``dvc_format``: ``(timestamps, captions, evidence)`` or None.

    The raw answer is split at the delimiter (case-sensitive): no delimiter -> None. The
    answer part is the SECOND piece (not the last), the grounding stage the first; the
    grounding stage gives its ``a - b`` pairs as written (not reordered). The fallback
    reads the whole text, grounding stage included. Where the paragraph parser raises, the
    script's ``dvc_format`` returns a 2-tuple that its caller cannot unpack: a crash.
    """
    if not delimiter:
        raise ValueError("the delimiter must not be empty")
    pieces = answer.split(delimiter)
    if len(pieces) < 2:
        return None
    try:
        timestamps, captions = _paragraph_events(pieces[1], collapse_dots=True)
        evidence_text = re.sub(r"\.{2,}", " ", pieces[0].lower())
        evidence = [[float(a), float(b)] for a, b in INTERVAL.findall(evidence_text)]
    except (_ParagraphError, ValueError) as error:
        raise ScriptCrash(f"dvc_format returns 2 values, 3 expected ({error})") from None
    if not timestamps:
        timestamps, captions = _fallback_events(answer)
    if not timestamps:
        return None
    return [[min(t), max(t)] for t in timestamps], captions, evidence
