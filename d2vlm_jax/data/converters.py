"""Converters from public annotation formats to the schema of SPEC §2.3 (:class:`Sample`).

Three source formats, one function each (all return a validated :class:`Sample` or raise
:class:`AnnotationError` naming the file, the sample index and the *source* field):

* :func:`convert_et_instruct` — E.T. Instruct 164K / E.T. Bench style records
  ``{"video", "duration", "task", "src", "tgt", "conversations": [{"from": "human", ...},
  {"from": "gpt", ...}]}``. Two timestamp conventions exist and both are read:

  - **``<vid>`` style** (E.T. Instruct ``et_instruct_164k_vid.json``, E.T. Chat): every
    timestamp of the text is one ``<vid>`` token; ``src`` (human turn) and ``tgt`` (gpt
    turn) list their values in order, flat (``"tgt": [36, 44, 49, 57]``). E.T. Bench
    writes ``tgt`` as pairs (``[[15.0, 31.0], ...]``); pairs are flattened first. Two
    ``<vid>`` joined by an interval connector (``-``, ``–``, ``to``; spaces allowed) become
    **one** ``<evi>`` with the interval ``[t_a, t_b]``; a following unit word
    (``seconds``/``second``/``secs``/``sec``/``s``) is dropped because the ``<evi>`` token
    now stands for the interval itself. A lone ``<vid>`` becomes a point event ``[t, t]``.
  - **``<evi>`` style** (the D²VLM release's re-annotation of E.T. Instruct): one ``<evi>``
    per interval; ``src``/``tgt`` are flat alternating ``[s0, e0, s1, e1, ...]`` (the
    authors pair consecutive values: ``pairs = [[t[i], t[i+1]] for i in range(0, len, 2)]``
    in ``fpo_anno_gen/build_fpo_anno.py``). A gpt value that already carries the grounding
    stage ``<evi>…<evi></evi> answer`` is reduced to the answer (our tokenizer regenerates
    the grounding stage from ``events``); both stages must have the same number of
    ``<evi>``. As in the authors' inference code, a question with one ``<evi>`` and a
    single ``src`` value is a point ``[t, t]``.

  ``<image>`` is removed from the human turn (the chat template places the frames). Only
  single-turn conversations (human, gpt) are supported.
* :func:`convert_charades_sta` — ``{"video", "duration", "query" | "sentence",
  "timestamp": [s, e]}`` → a ``tvg`` sample.
* :func:`convert_dense_captions` — YouCook2 / ActivityNet Captions style ``{"video",
  "duration", "timestamps": [[s, e], ...], "sentences": [...]}`` → a ``dvc`` sample whose
  answer is ``"<evi> sentence one. <evi> sentence two."``.

Timestamp checks (finite, non-negative, not beyond duration, reversed → swapped and
counted) are those of :func:`d2vlm_jax.data.schema.validate_sample`; errors it raises about
``events[k]`` / ``question_events[k]`` are re-labelled with the source field (``tgt``,
``src``, ``timestamp``, ``timestamps[k]``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from d2vlm_jax.data.schema import (EVIDENCE_END_TOKEN, EVIDENCE_TOKEN, IMAGE_TOKEN,
                                   AnnotationError, Sample, ValidationReport,
                                   iter_checked, validate_sample)


MATCH_TOKEN = "<vid>"

# Two <vid> tokens forming one interval, with an optional unit word after the second.
_VID_PAIR = re.compile(
    r"<vid>\s*(?:-|–|to)\s*<vid>(?:\s*(?:seconds|second|secs|sec|s)\b)?")
_VID_SINGLE = re.compile(r"<vid>(?:\s*(?:seconds|second|secs|sec|s)\b)?")

CHARADES_QUESTION = 'When does "{query}" happen in the video?'
CHARADES_ANSWER = "It happens at <evi>."
DENSE_CAPTION_QUESTION = ("Localize a series of events in the video and describe each of "
                          "them with its time.")

Converter = Callable[..., Sample]


def _fail(file: str, index: int | None, field: str, reason: str):
    raise AnnotationError(file, index, field, reason)


def _validate_relabelled(record: dict[str, Any], *, file: str, index: int | None,
                         report: ValidationReport | None,
                         relabel: Callable[[str], str]) -> Sample:
    """Runs the schema validation; errors on intervals name the source field instead."""
    try:
        return validate_sample(record, file=file, index=index, report=report)
    except AnnotationError as error:
        raise AnnotationError(file, index, relabel(error.field), error.reason) from None


def _relabel_events(events_name: Callable[[int], str],
                    question_name: Callable[[int], str] | None = None
                    ) -> Callable[[str], str]:
    def relabel(field: str) -> str:
        match = re.fullmatch(r"(events|question_events)\[(\d+)\]", field)
        if match is None:
            return field
        k = int(match.group(2))
        if match.group(1) == "events":
            return events_name(k)
        return question_name(k) if question_name is not None else field
    return relabel


def _timestamps(record: Mapping[str, Any], key: str, file: str,
                index: int | None) -> list[float]:
    """Reads ``src``/``tgt``: absent/None → []; flat numbers or [s, e] pairs → flat list."""
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(file, index, key, f"expected a list of timestamps, got {type(value).__name__}")
    flat: list[float] = []
    for k, item in enumerate(value):
        items = item if isinstance(item, (list, tuple)) else [item]
        if isinstance(item, (list, tuple)) and len(item) != 2:
            _fail(file, index, f"{key}[{k}]", f"expected a number or a [start, end] pair, "
                                              f"got {item!r}")
        for t in items:
            if not isinstance(t, (int, float)) or isinstance(t, bool):
                _fail(file, index, f"{key}[{k}]", f"{t!r} is not a number")
            flat.append(t)
    return flat


def _vid_to_evi(text: str, times: list[float], *, file: str, index: int | None,
                text_field: str, times_field: str) -> tuple[str, list[list[float]]]:
    """``<vid>``-style text and its flat timestamps → ``<evi>`` text and intervals."""
    count = text.count(MATCH_TOKEN)
    if count != len(times):
        _fail(file, index, times_field, f"has {len(times)} timestamp(s) but '{text_field}' "
                                        f"has {count} '{MATCH_TOKEN}' token(s)")
    pieces: list[str] = []
    intervals: list[list[float]] = []
    position, cursor = 0, 0
    while True:
        start = text.find(MATCH_TOKEN, position)
        if start < 0:
            break
        pair = _VID_PAIR.match(text, start)
        if pair is not None:
            intervals.append([times[cursor], times[cursor + 1]])
            cursor, end = cursor + 2, pair.end()
        else:
            single = _VID_SINGLE.match(text, start)
            intervals.append([times[cursor], times[cursor]])
            cursor, end = cursor + 1, single.end()
        pieces.append(text[position:start])
        pieces.append(EVIDENCE_TOKEN)
        position = end
    pieces.append(text[position:])
    return "".join(pieces), intervals


def _evi_pairs(text: str, times: list[float], *, file: str, index: int | None,
               text_field: str, times_field: str, allow_point: bool) -> list[list[float]]:
    """``<evi>``-style flat ``[s0, e0, s1, e1, ...]`` → intervals (one per ``<evi>``)."""
    count = text.count(EVIDENCE_TOKEN)
    if allow_point and count == 1 and len(times) == 1:
        return [[times[0], times[0]]]
    if len(times) != 2 * count:
        _fail(file, index, times_field, f"has {len(times)} value(s) but '{text_field}' has "
                                        f"{count} '{EVIDENCE_TOKEN}' token(s) (expected "
                                        f"{2 * count}: start, end per token)")
    return [[times[2 * k], times[2 * k + 1]] for k in range(count)]


def convert_et_instruct(record: Any, *, file: str, index: int | None,
                        report: ValidationReport | None = None,
                        video_format: str = "{video}") -> Sample:
    """E.T. Instruct / E.T. Bench / D²VLM-style record → :class:`Sample` (see module doc).

    Args:
      record: one decoded JSON object.
      file, index: where the record comes from, for error messages.
      report: optional counters (reversed intervals swapped).
      video_format: format string applied to ``record["video"]`` (e.g. ``"et/{video}"``).

    Raises:
      AnnotationError: naming the source field (``conversations[1].value``, ``tgt``, ...).
    """
    if not isinstance(record, Mapping):
        _fail(file, index, "<sample>", f"expected a JSON object, got {type(record).__name__}")
    for key in ("video", "duration", "task", "conversations"):
        if key not in record:
            _fail(file, index, key, "missing required field")
    conversations = record["conversations"]
    if not isinstance(conversations, list) or len(conversations) != 2:
        n = len(conversations) if isinstance(conversations, list) else type(conversations)
        _fail(file, index, "conversations", f"expected one human and one gpt turn, got {n}")
    for k, (turn, role) in enumerate(zip(conversations, ("human", "gpt"))):
        if not isinstance(turn, Mapping) or turn.get("from") != role:
            got = turn.get("from") if isinstance(turn, Mapping) else turn
            _fail(file, index, f"conversations[{k}].from", f"expected {role!r}, got {got!r}")
        if not isinstance(turn.get("value"), str):
            _fail(file, index, f"conversations[{k}].value", "expected a string")
    human = conversations[0]["value"].replace(IMAGE_TOKEN, "").strip()
    gpt = conversations[1]["value"].strip()
    src = _timestamps(record, "src", file, index)
    tgt = _timestamps(record, "tgt", file, index)

    uses_vid = MATCH_TOKEN in human or MATCH_TOKEN in gpt
    uses_evi = EVIDENCE_TOKEN in human or EVIDENCE_TOKEN in gpt
    if uses_vid and uses_evi:
        _fail(file, index, "conversations", f"mixes '{MATCH_TOKEN}' and '{EVIDENCE_TOKEN}' "
                                            "timestamp tokens")
    if uses_evi:
        if EVIDENCE_END_TOKEN in gpt:
            grounding, answer = gpt.split(EVIDENCE_END_TOKEN, 1)
            if EVIDENCE_END_TOKEN in answer:
                _fail(file, index, "conversations[1].value",
                      f"has more than one '{EVIDENCE_END_TOKEN}'")
            answer = answer.strip()
            if grounding.count(EVIDENCE_TOKEN) != answer.count(EVIDENCE_TOKEN):
                _fail(file, index, "conversations[1].value",
                      f"grounding stage has {grounding.count(EVIDENCE_TOKEN)} "
                      f"'{EVIDENCE_TOKEN}' but the answer has {answer.count(EVIDENCE_TOKEN)}")
        else:
            answer = gpt
        question = human
        question_events = _evi_pairs(question, src, file=file, index=index,
                                     text_field="conversations[0].value", times_field="src",
                                     allow_point=True)
        events = _evi_pairs(answer, tgt, file=file, index=index,
                            text_field="conversations[1].value", times_field="tgt",
                            allow_point=False)
    else:
        question, question_events = _vid_to_evi(
            human, src, file=file, index=index, text_field="conversations[0].value",
            times_field="src")
        answer, events = _vid_to_evi(
            gpt, tgt, file=file, index=index, text_field="conversations[1].value",
            times_field="tgt")

    video = record["video"]
    converted = {
        "video": video_format.format(video=video) if isinstance(video, str) else video,
        "duration": record["duration"], "task": record["task"],
        "question": question, "answer": answer,
        "events": events, "question_events": question_events,
    }
    relabel = _relabel_events(lambda k: f"tgt (event {k})", lambda k: f"src (event {k})")
    relabel_text = {"question": "conversations[0].value", "answer": "conversations[1].value"}
    return _validate_relabelled(converted, file=file, index=index, report=report,
                                relabel=lambda f: relabel_text.get(f, relabel(f)))


def convert_charades_sta(record: Any, *, file: str, index: int | None,
                         report: ValidationReport | None = None,
                         video_format: str = "{video}") -> Sample:
    """Charades-STA style ``{"video", "duration", "query"|"sentence", "timestamp"}`` → tvg.

    The question is ``'When does "{query}" happen in the video?'`` (query stripped of its
    final period) and the answer ``"It happens at <evi>."`` with the one event.
    """
    if not isinstance(record, Mapping):
        _fail(file, index, "<sample>", f"expected a JSON object, got {type(record).__name__}")
    for key in ("video", "duration", "timestamp"):
        if key not in record:
            _fail(file, index, key, "missing required field")
    query_key = "query" if "query" in record else "sentence"
    query = record.get(query_key)
    if not isinstance(query, str) or not query.strip():
        _fail(file, index, query_key, f"expected a non-empty string, got {query!r}")
    query = query.strip().rstrip(".").strip()
    for token in (EVIDENCE_TOKEN, EVIDENCE_END_TOKEN, IMAGE_TOKEN, MATCH_TOKEN):
        if token in query:
            _fail(file, index, query_key, f"contains the special token '{token}'")
    timestamp = record["timestamp"]
    if not isinstance(timestamp, list) or len(timestamp) != 2:
        _fail(file, index, "timestamp", f"expected [start, end], got {timestamp!r}")
    video = record["video"]
    converted = {
        "video": video_format.format(video=video) if isinstance(video, str) else video,
        "duration": record["duration"], "task": "tvg",
        "question": CHARADES_QUESTION.format(query=query), "answer": CHARADES_ANSWER,
        "events": [timestamp], "question_events": [],
    }
    return _validate_relabelled(converted, file=file, index=index, report=report,
                                relabel=_relabel_events(lambda k: "timestamp"))


def convert_dense_captions(record: Any, *, file: str, index: int | None,
                           report: ValidationReport | None = None,
                           video_format: str = "{video}") -> Sample:
    """YouCook2 / ActivityNet Captions style record → a ``dvc`` sample.

    ``{"video", "duration", "timestamps": [[s, e], ...], "sentences": [...]}``; the answer
    is ``"<evi> {sentence 0}. <evi> {sentence 1}. ..."`` with events in the given order.
    """
    if not isinstance(record, Mapping):
        _fail(file, index, "<sample>", f"expected a JSON object, got {type(record).__name__}")
    for key in ("video", "duration", "timestamps", "sentences"):
        if key not in record:
            _fail(file, index, key, "missing required field")
    timestamps, sentences = record["timestamps"], record["sentences"]
    if not isinstance(timestamps, list) or not timestamps:
        _fail(file, index, "timestamps", f"expected a non-empty list of [start, end], got "
                                         f"{timestamps!r}")
    if not isinstance(sentences, list):
        _fail(file, index, "sentences", f"expected a list of strings, got "
                                        f"{type(sentences).__name__}")
    if len(sentences) != len(timestamps):
        _fail(file, index, "sentences", f"has {len(sentences)} sentence(s) but 'timestamps' "
                                        f"has {len(timestamps)} interval(s)")
    parts = []
    for k, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            _fail(file, index, f"sentences[{k}]", f"expected a non-empty string, got "
                                                  f"{sentence!r}")
        for token in (EVIDENCE_TOKEN, EVIDENCE_END_TOKEN, IMAGE_TOKEN, MATCH_TOKEN):
            if token in sentence:
                _fail(file, index, f"sentences[{k}]", f"contains the special token '{token}'")
        sentence = sentence.strip()
        if sentence[-1] not in ".!?":
            sentence += "."
        parts.append(f"{EVIDENCE_TOKEN} {sentence}")
    video = record["video"]
    converted = {
        "video": video_format.format(video=video) if isinstance(video, str) else video,
        "duration": record["duration"], "task": "dvc",
        "question": DENSE_CAPTION_QUESTION, "answer": " ".join(parts),
        "events": timestamps, "question_events": [],
    }
    return _validate_relabelled(converted, file=file, index=index, report=report,
                                relabel=_relabel_events(lambda k: f"timestamps[{k}]"))


CONVERTERS: dict[str, Converter] = {
    "et_instruct": convert_et_instruct,
    "charades_sta": convert_charades_sta,
    "dense_captions": convert_dense_captions,
}


def convert_records(records: Sequence[Any], source_format: str, *, file: str,
                    on_error: str = "raise", report: ValidationReport | None = None,
                    video_format: str = "{video}") -> list[Sample]:
    """Converts a list of records of one format (a key of :data:`CONVERTERS`).

    ``on_error="skip"`` drops invalid records with a logged warning, counted in
    ``report.num_skipped``; ``"raise"`` (default) raises the first :class:`AnnotationError`.
    """
    if source_format not in CONVERTERS:
        raise ValueError(f"unknown source format {source_format!r}; one of "
                         f"{sorted(CONVERTERS)}")
    convert = functools.partial(CONVERTERS[source_format], video_format=video_format)
    return [sample for _, sample in iter_checked(records, convert, file=file, on_error=on_error, report=report)]


def convert_file(path: str | os.PathLike, source_format: str, **kwargs: Any) -> list[Sample]:
    """Reads a JSON list of records of ``source_format`` and converts it (see
    :func:`convert_records` for ``on_error``, ``report``, ``video_format``)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    file = os.path.basename(os.fspath(path))
    if not isinstance(records, list):
        raise AnnotationError(file, None, "<file>", "expected a JSON list of records")
    return convert_records(records, source_format, file=file, **kwargs)
