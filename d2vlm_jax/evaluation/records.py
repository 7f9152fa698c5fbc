"""Prediction records: loading predictions files, naming records in errors, field access.

A prediction record is one benchmark sample in the E.T. Bench file layout plus the model's
raw answer: ``idx``, ``task``, ``source``, ``video``, the ground truth of its task (``tgt``
intervals in seconds, ``o`` options and ``p`` the right option's index, ``g`` captions)
and ``a``, the answer text. A predictions file is a JSON list of records, a JSON Lines file
(one record a line), or a directory of such files (what the authors' inference writes: one
``etbench_<chunk>.json`` per process).

Nothing here knows a scoring rule; the protocols (``evaluation/protocols``) say which fields
a task needs and raise :class:`EvaluationInputError` naming the record and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class EvaluationInputError(ValueError):
    """A predictions file or record is unusable: missing or malformed field, bad JSON."""


def describe(record: Mapping, position: int) -> str:
    """``record 3, idx=17, video='a.mp4', task='tvg', source='charades_sta'`` for messages."""
    parts = [f"record {position}"]
    if isinstance(record, Mapping):
        for key in ("idx", "video", "task", "source"):
            if key in record:
                parts.append(f"{key}={record[key]!r}")
    return ", ".join(parts)


def field(record: Mapping, position: int, name: str) -> Any:
    """``record[name]``; :class:`EvaluationInputError` naming the record when it is absent."""
    if name not in record or record[name] is None:
        raise EvaluationInputError(f"{describe(record, position)}: missing field {name!r}")
    return record[name]


def check_records(records: Sequence[Any], required: Sequence[str] = ()) -> None:
    """Every record is a dict holding the ``required`` fields."""
    for position, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise EvaluationInputError(f"record {position}: expected a JSON object, got "
                                       f"{type(record).__name__}")
        for name in required:
            field(record, position, name)


# ----------------------------------------------------------------------------- files

def every_json_file(path: str) -> bool:
    """File filter: every ``*.json`` / ``*.jsonl`` file of a predictions directory."""
    return True


def _load_file(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                data = [json.loads(line) for line in f if line.strip()]
            else:
                data = json.load(f)
    except json.JSONDecodeError as error:
        raise EvaluationInputError(f"{path}: malformed JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise EvaluationInputError(f"{path}: not UTF-8 text ({error})") from None
    if not isinstance(data, list):
        raise EvaluationInputError(f"{path}: expected a JSON list of prediction records, got "
                                   f"{type(data).__name__}")
    return data


def predictions_files(path: str, keep: Callable[[str], bool] = every_json_file) -> list[str]:
    """The files a predictions path stands for.

    A file is itself. A directory gives its non-hidden entries ending in ``json`` or
    ``jsonl`` **in ``os.listdir`` order** (the order the authors' scripts read them in, which
    decides the order of sources and samples), joined to the directory, kept where
    ``keep(joined_path)`` is true (each protocol passes its script's rule).
    """
    if not os.path.exists(path):
        raise EvaluationInputError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        return [path]
    names = [n for n in os.listdir(path) if not n.startswith(".")
             and (n.endswith("json") or n.endswith("jsonl"))]
    files = [os.path.join(path, n) for n in names]
    files = [f for f in files if keep(f) and os.path.isfile(f)]
    if not files:
        raise EvaluationInputError(f"{path}: no predictions file (*.json, *.jsonl) in this directory")
    return files


def load_predictions(path: str, keep: Callable[[str], bool] = every_json_file) -> list:
    """All records of a predictions file or directory, concatenated in file order."""
    records: list = []
    for file in predictions_files(path, keep):
        records += _load_file(file)
    return records
