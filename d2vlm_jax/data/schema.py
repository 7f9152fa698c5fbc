"""The annotation schema (SPEC §2.3): one JSON list of samples, validated on load.

One sample::

    {"video": "relative/path.mp4", "duration": 31.2, "task": "tvg",
     "question": "When does the person open the fridge?",
     "answer": "The person opens the fridge at <evi>.",
     "events": [[3.0, 7.5]],
     "question_events": []}

``events`` are the intervals (seconds) referenced by the answer's ``<evi>`` tokens, in order
of appearance; the grounding stage of the response (``<evi>, …, <evi></evi>``) is *generated*
from them by the tokenization step, so neither field contains ``</evi>``. ``question_events``
are the intervals of the ``<evi>`` tokens a user writes in the question. Preference files
(FPO, SPEC §4.3) add ``rejected``: a list of ``{"answer": str, "events": [[s, e], ...],
"family": str, "event_index": int}``.

Validation rules (each violation raises :class:`AnnotationError` naming file, sample index
and field, e.g. ``train.json sample 12 field 'events[1]': end 9.0 is beyond the duration
8.0 by 1.0 s``):

* required fields with their types (``video`` a non-empty relative path, ``duration`` a
  positive finite number, ``task``/``question`` non-empty strings, ``answer`` a string,
  ``events``/``question_events`` lists of ``[start, end]`` number pairs);
* number of ``<evi>`` in ``answer`` == ``len(events)``, in ``question`` ==
  ``len(question_events)`` (same for each rejected answer and its events);
* timestamps non-negative and finite, not beyond ``duration`` (the message says by how
  much); no ``<image>`` and no ``</evi>`` in question or answer (the template adds them).

Reversed intervals (``end < start``): SPEC §2.2 says "swapped if reversed". We **swap** them
on load rather than reject the sample, log a warning naming file/sample/field, and count the
swap in :class:`ValidationReport` (``num_swapped``), so a dataset with many reversals is
visible in the logs instead of silently fixed. Everything else is an error.

``load_annotations(path, on_error="skip")`` turns errors into counted, logged skips instead
(``ValidationReport.num_skipped``); the default ``"raise"`` stops at the first bad sample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

EVIDENCE_TOKEN = "<evi>"
EVIDENCE_END_TOKEN = "</evi>"
IMAGE_TOKEN = "<image>"

Interval = tuple[float, float]

REQUIRED_FIELDS = ("video", "duration", "task", "question", "answer", "events",
                   "question_events")


class AnnotationError(ValueError):
    """A sample that breaks the schema. The message names the file, sample index and field."""

    def __init__(self, file: str, index: int | None, field: str, reason: str):
        self.file = file
        self.index = index
        self.field = field
        self.reason = reason
        where = f"{file} sample {index}" if index is not None else file
        super().__init__(f"{where} field '{field}': {reason}")


@dataclasses.dataclass
class ValidationReport:
    """Counters filled by :func:`validate_sample` / :func:`load_annotations`.

    Attributes:
      num_samples: samples read (valid or not).
      num_valid: samples returned.
      num_swapped: reversed intervals swapped (each interval counts once).
      num_skipped: samples dropped with ``on_error="skip"``.
      skipped_messages: the error message of each skipped sample.
    """
    num_samples: int = 0
    num_valid: int = 0
    num_swapped: int = 0
    num_skipped: int = 0
    skipped_messages: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """One rejected response of a preference sample (SPEC §4.3).

    Attributes:
      answer: the rejected answer text, with one ``<evi>`` per entry of ``events``.
      events: intervals in seconds, ``((start, end), ...)``.
      family: the perturbation family (e.g. ``"temporal_shift"``, ``"text_replace"``).
      event_index: index of the perturbed event (non-negative).

    Also readable like the JSON dict it comes from (``rejected["answer"]``).
    """
    answer: str
    events: tuple[Interval, ...]
    family: str
    event_index: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", _as_interval_tuple(self.events))

    def __getitem__(self, key: str) -> Any:
        if key not in _REJECTED_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"answer", "events": [[s, e], ...], "family", "event_index"}``."""
        return {"answer": self.answer, "events": [list(e) for e in self.events],
                "family": self.family, "event_index": self.event_index}


_REJECTED_KEYS = ("answer", "events", "family", "event_index")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One validated annotation (SPEC §2.3). Intervals are stored as tuples (immutable).

    Attributes:
      video: path of the video relative to the dataset's video root.
      duration: video duration in seconds (> 0).
      task: task name (``"tvg"``, ``"dvc"``, ...).
      question: user question; one ``<evi>`` per entry of ``question_events``.
      answer: answer text (no grounding stage); one ``<evi>`` per entry of ``events``.
      events: ``((start, end), ...)`` seconds, ``start <= end``, in order of mention.
      question_events: ``((start, end), ...)`` seconds of the question's ``<evi>`` tokens.
      rejected: rejected responses of a preference sample, or None for SFT data.
    """
    video: str
    duration: float
    task: str
    question: str
    answer: str
    events: tuple[Interval, ...] = ()
    question_events: tuple[Interval, ...] = ()
    rejected: tuple[Rejected, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", _as_interval_tuple(self.events))
        object.__setattr__(self, "question_events", _as_interval_tuple(self.question_events))
        if self.rejected is not None:
            object.__setattr__(self, "rejected", tuple(
                r if isinstance(r, Rejected) else Rejected(**r) for r in self.rejected))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the sample (``rejected`` only when present)."""
        record: dict[str, Any] = {
            "video": self.video, "duration": self.duration, "task": self.task,
            "question": self.question, "answer": self.answer,
            "events": [list(e) for e in self.events],
            "question_events": [list(e) for e in self.question_events],
        }
        if self.rejected is not None:
            record["rejected"] = [r.to_dict() for r in self.rejected]
        return record


def _as_interval_tuple(intervals: Sequence[Sequence[float]]) -> tuple[Interval, ...]:
    return tuple((float(s), float(e)) for s, e in intervals)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_str(record: Mapping[str, Any], field: str, fail, *, non_empty: bool) -> str:
    value = record[field]
    if not isinstance(value, str):
        fail(field, f"expected a string, got {type(value).__name__}")
    if non_empty and not value.strip():
        fail(field, "must not be empty")
    return value


def _check_text_markers(text: str, field: str, fail) -> None:
    if IMAGE_TOKEN in text:
        fail(field, f"contains '{IMAGE_TOKEN}' (the chat template inserts the frames)")
    if EVIDENCE_END_TOKEN in text:
        fail(field, f"contains '{EVIDENCE_END_TOKEN}' (the grounding stage is generated "
                    "from 'events', it is not part of the annotation)")


def _check_intervals(value: Any, field: str, duration: float, fail,
                     on_swap) -> list[Interval]:
    if not isinstance(value, list):
        fail(field, f"expected a list of [start, end] pairs, got {type(value).__name__}")
    intervals = []
    for k, pair in enumerate(value):
        name = f"{field}[{k}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            fail(name, f"expected a [start, end] pair, got {pair!r}")
        start, end = pair
        for which, t in (("start", start), ("end", end)):
            if not _is_number(t):
                fail(name, f"{which} {t!r} is not a number")
            if not math.isfinite(t):
                fail(name, f"{which} {t} is not finite")
            if t < 0:
                fail(name, f"{which} {t} is negative")
            if t > duration:
                fail(name, f"{which} {t} is beyond the duration {duration} by "
                           f"{t - duration:.6g} s")
        if end < start:
            on_swap(name, f"end {end} is before start {start}; swapped (SPEC §2.2)")
            start, end = end, start
        intervals.append((float(start), float(end)))
    return intervals


def _check_evidence_count(text: str, text_field: str, intervals: list[Interval],
                          intervals_field: str, fail) -> None:
    count = text.count(EVIDENCE_TOKEN)
    if count != len(intervals):
        fail(intervals_field, f"has {len(intervals)} interval(s) but '{text_field}' has "
                              f"{count} '{EVIDENCE_TOKEN}' token(s)")


def validate_sample(record: Any, *, file: str, index: int | None,
                    report: ValidationReport | None = None) -> Sample:
    """Validates one JSON record and returns the :class:`Sample`.

    Args:
      record: the decoded JSON object of one sample.
      file: file name used in error messages (e.g. ``"train.json"``).
      index: the sample's index in the file (None for a record outside a file).
      report: optional counters; ``num_swapped`` grows by one per reversed interval.

    Raises:
      AnnotationError: naming the file, sample index and field, on any rule of the schema.
    """
    def fail(field: str, reason: str):
        raise AnnotationError(file, index, field, reason)

    def on_swap(field: str, reason: str) -> None:
        logger.warning("%s sample %s field '%s': %s", file, index, field, reason)
        if report is not None:
            report.num_swapped += 1

    if not isinstance(record, Mapping):
        fail("<sample>", f"expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            fail(field, "missing required field")

    video = _check_str(record, "video", fail, non_empty=True)
    if os.path.isabs(video):
        fail("video", f"must be a path relative to the video root, got absolute {video!r}")
    duration = record["duration"]
    if not _is_number(duration) or not math.isfinite(duration) or duration <= 0:
        fail("duration", f"expected a positive finite number of seconds, got {duration!r}")
    duration = float(duration)
    task = _check_str(record, "task", fail, non_empty=True)
    question = _check_str(record, "question", fail, non_empty=True)
    answer = _check_str(record, "answer", fail, non_empty=False)
    _check_text_markers(question, "question", fail)
    _check_text_markers(answer, "answer", fail)

    events = _check_intervals(record["events"], "events", duration, fail, on_swap)
    question_events = _check_intervals(record["question_events"], "question_events",
                                       duration, fail, on_swap)
    _check_evidence_count(answer, "answer", events, "events", fail)
    _check_evidence_count(question, "question", question_events, "question_events", fail)

    rejected = None
    if record.get("rejected") is not None:
        rejected = _check_rejected(record["rejected"], duration, fail, on_swap)

    return Sample(video=video, duration=duration, task=task, question=question,
                  answer=answer, events=tuple(events), question_events=tuple(question_events),
                  rejected=rejected)


def _check_rejected(value: Any, duration: float, fail, on_swap) -> tuple[Rejected, ...]:
    if not isinstance(value, list):
        fail("rejected", f"expected a list of rejected responses, got {type(value).__name__}")
    rejected = []
    for k, item in enumerate(value):
        prefix = f"rejected[{k}]"
        if not isinstance(item, Mapping):
            fail(prefix, f"expected a JSON object, got {type(item).__name__}")
        for key in _REJECTED_KEYS:
            if key not in item:
                fail(f"{prefix}.{key}", "missing required field")
        answer = item["answer"]
        if not isinstance(answer, str):
            fail(f"{prefix}.answer", f"expected a string, got {type(answer).__name__}")
        _check_text_markers(answer, f"{prefix}.answer", fail)
        events = _check_intervals(item["events"], f"{prefix}.events", duration, fail, on_swap)
        _check_evidence_count(answer, f"{prefix}.answer", events, f"{prefix}.events", fail)
        family = item["family"]
        if not isinstance(family, str) or not family:
            fail(f"{prefix}.family", f"expected a non-empty string, got {family!r}")
        event_index = item["event_index"]
        if (not isinstance(event_index, int) or isinstance(event_index, bool)
                or event_index < 0):
            fail(f"{prefix}.event_index", f"expected a non-negative integer, got "
                                          f"{event_index!r}")
        rejected.append(Rejected(answer=answer, events=tuple(events), family=family,
                                 event_index=event_index))
    return tuple(rejected)


def iter_checked(records: Sequence[Any], check: Callable[..., Sample], *, file: str, on_error: str = "raise",
                 report: ValidationReport | None = None) -> Iterator[tuple[int, Sample]]:
    """Applies ``check(record, file=, index=, report=)`` (a validator or a converter) to each
    record and yields ``(index in the file, sample)``.

    ``on_error="raise"`` stops at the first :class:`AnnotationError`; ``"skip"`` logs it,
    counts it in ``report`` and goes on (indices of skipped records are left out).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = report if report is not None else ValidationReport()
    for index, record in enumerate(records):
        report.num_samples += 1
        try:
            sample = check(record, file=file, index=index, report=report)
        except AnnotationError as error:
            if on_error == "raise":
                raise
            report.num_skipped += 1
            report.skipped_messages.append(str(error))
            logger.warning("skipping %s", error)
            continue
        report.num_valid += 1
        yield index, sample


def iter_validated(records: Sequence[Any], *, file: str, on_error: str = "raise",
                   report: ValidationReport | None = None) -> Iterator[Sample]:
    """Validates records one by one; ``on_error`` is ``"raise"`` or ``"skip"``."""
    for _, sample in iter_checked(records, validate_sample, file=file, on_error=on_error, report=report):
        yield sample


def read_json_list(path: str | os.PathLike) -> list[Any]:
    """The JSON list of records in ``path``; errors name the file."""
    file = os.path.basename(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(os.fspath(path), None, "<file>", "file not found") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(os.fspath(path), None, "<file>",
                              f"invalid JSON: {error}") from None
    if not isinstance(records, list):
        raise AnnotationError(file, None, "<file>",
                              f"expected a JSON list of samples, got {type(records).__name__}")
    return records


def load_annotations_with_indices(path: str | os.PathLike, *, on_error: str = "raise",
                                  report: ValidationReport | None = None) -> tuple[list[Sample], list[int]]:
    """Like :func:`load_annotations`, plus each sample's index in the file (skipped samples
    leave gaps, so an index always points into the file)."""
    file = os.path.basename(os.fspath(path))
    records = read_json_list(path)
    report = report if report is not None else ValidationReport()
    pairs = list(iter_checked(records, validate_sample, file=file, on_error=on_error, report=report))
    if report.num_swapped or report.num_skipped:
        logger.warning("%s: %d samples, %d valid, %d skipped, %d reversed interval(s) swapped",
                       file, report.num_samples, report.num_valid, report.num_skipped,
                       report.num_swapped)
    return [sample for _, sample in pairs], [index for index, _ in pairs]


def load_annotations(path: str | os.PathLike, *, on_error: str = "raise",
                     report: ValidationReport | None = None) -> list[Sample]:
    """Reads and validates one annotation file (a JSON list of samples).

    Args:
      path: the JSON file.
      on_error: ``"raise"`` (default) stops at the first invalid sample with an
        :class:`AnnotationError`; ``"skip"`` drops it, logs a warning and counts it in
        ``report.num_skipped``.
      report: optional :class:`ValidationReport` to receive the counters.

    Raises:
      AnnotationError: unreadable JSON, not a list, or (``on_error="raise"``) a bad sample.
    """
    return load_annotations_with_indices(path, on_error=on_error, report=report)[0]


def save_annotations(samples: Sequence[Sample], path: str | os.PathLike) -> None:
    """Writes samples as a JSON list, one sample per line (read by :func:`load_annotations`)."""
    lines = [json.dumps(s.to_dict(), allow_nan=False) for s in samples]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")
