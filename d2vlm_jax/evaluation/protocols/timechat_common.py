"""Helpers shared by the TimeChat-format protocols (``timechat_charades``, ``timechat_youcook2``).

The authors' TimeChat-format pipelines stop with an exception on inputs their code does not
expect (a failed answer in the Charades converter looks up a record field ``index`` that
their inference never writes; the YouCook2 converter unpacks two values into three when an
answer has no event; ...). Such a run produces no number at all. :class:`AuthorsStops`
collects these places: with ``strict=True`` the first one raises
:class:`AuthorsScriptWouldStop`; otherwise scoring goes on with the evident intent of the
code (documented at each call site and in ``docs/EVALUATION.md``) and the metrics report
how many records would have stopped the authors' script, by reason, so a number is never
mistaken for one the authors' script could have printed.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

DELIMITERS = {"v2": "Answer: ", "v3": "</evi>", "v4": ""}
DEFAULT_DELIMITER = DELIMITERS["v3"]


def resolve_delimiter(delimiter: str | None) -> str:
    """The scripts' ``--delimiter``: None = ``v3`` (``</evi>``); ``v2``/``v3``/``v4`` or text.

    ``v4`` (empty) makes their ``str.split`` raise; refused here with a clear error.
    """
    text = DEFAULT_DELIMITER if delimiter is None else DELIMITERS.get(delimiter, delimiter)
    if not text:
        raise ValueError("the delimiter must not be empty (the scripts' 'v4' = '' fails in "
                         "str.split)")
    return text


class AuthorsScriptWouldStop(RuntimeError):
    """The authors' script raises on this input (it prints no metric at all)."""


class AuthorsStops:
    """Counts (or, strict, raises at) the places where the authors' script would stop."""

    def __init__(self, script: str, strict: bool):
        self.script = script
        self.strict = strict
        self.counts: collections.Counter = collections.Counter()
        self.first: dict[str, str] = {}

    def stop(self, reason: str, detail: str) -> None:
        """Records one stop of kind ``reason``; raises at once when strict."""
        if self.strict:
            raise AuthorsScriptWouldStop(f"the authors' {self.script} stops here ({reason}): {detail}")
        self.counts[reason] += 1
        self.first.setdefault(reason, detail)

    def report(self) -> dict[str, Any]:
        """``authors_script_would_stop``: total count, counts by reason, first example each."""
        if self.counts:
            logger.warning("the authors' %s would stop on these records (%s); scored with the "
                           "documented repair instead", self.script, dict(self.counts))
        return {"authors_script_would_stop": sum(self.counts.values()),
                "authors_stop_reasons": dict(self.counts),
                "authors_stop_examples": dict(self.first)}


def result_document(metrics: dict[str, Any], *, benchmark: str, task: str, source: str,
                    reproduces: str, score_key: str, stops: AuthorsStops, notes: list[str],
                    printed: dict[str, Any]) -> dict[str, Any]:
    """The protocol result: the flat metrics, plus the ``tasks`` / ``notes`` /
    ``script_failure`` / ``printed`` fields that ``scoring.format_table`` and
    ``launch/evaluate.py`` read (shared with the E.T. Bench protocols)."""
    report = stops.report()
    failure = None
    if report["authors_script_would_stop"]:
        failure = (f"the authors' scripts stop on {report['authors_script_would_stop']} "
                   f"record(s) ({', '.join(sorted(report['authors_stop_reasons']))}); these "
                   "numbers use the documented repairs")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
    entry = {"sources": {source: numbers}, "score_key": score_key,
             "score": metrics.get(score_key), "num_samples": metrics.get("num_records")}
    return {**metrics, **report, "benchmark": benchmark, "reproduces": reproduces,
            "tasks": {task: entry}, "printed": printed, "notes": notes,
            "script_failure": failure}


def select_records(records: Sequence[Mapping], task: str, source: str,
                   project_task: str) -> list[Mapping]:
    """The records the authors' converter reads: ``task``/``source`` as their filter asks.

    The project's own predictions files name the benchmark in ``task`` alone
    (``charades_sta`` / ``youcook2_dvc``, no ``source``); those are read as the authors'
    ``task``/``source`` pair. Raises ValueError (naming the expected fields) if none match.
    """
    selected = [r for r in records
                if (r.get("task") == task and r.get("source") == source)
                or r.get("task") == project_task]
    if not selected:
        raise ValueError(f"no record with task={task!r} and source={source!r} (or task="
                         f"{project_task!r}) among {len(records)} records")
    return selected


def json_object_keys(entries: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    """What ``json.load(json.dump(d))`` gives for a dict ``d`` built by these insertions.

    A Python dict keeps ``5`` and ``"5"`` apart; JSON writes both as ``"5"`` and reading
    keeps the value written last, at the position of the first. ``entries`` are the
    ``(key, value)`` assignments in order (a re-assigned key keeps its first position).
    """
    python_dict: dict[Any, Any] = {}
    for key, value in entries:
        python_dict[key] = value
    out: dict[str, Any] = {}
    for key, value in python_dict.items():
        out[_json_key(key)] = value
    return out


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)  # True -> "true", 5 -> "5", 2.0 -> "2.0", None -> "null"
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def load_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path}: cannot read JSON ({error})") from error
