"""What the four authors' E.T. Bench scripts share: records, grouping, multiple choice, summary.

The scripts (``compute_metrics_original_etchat.py`` = the official E.T. Bench script,
``..._strict_rvq.py``, ``new_compute_metrics.py`` = the D²VLM script, ``new_compute_metircs
_looser.py``) share their driver: samples grouped by ``task`` then ``source`` in order of
first appearance, one evaluation per (task, source), every per-source number rounded to 5
decimals, a task score = the mean of its sources' (rounded) numbers, rounded again, and the
merged scores read POSITIONALLY off the list of task scores (``met[:3]`` = the first three
task scores, whatever tasks they are). This module reproduces that driver; the protocol
modules supply the per-task rules.

Where a script would stop with a Python error, the result says so (``script_failure``)
instead of inventing numbers; the other sources are still scored.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from d2vlm_jax.evaluation import coco_caption
from d2vlm_jax.evaluation.etbench_answers import ScriptCrash
from d2vlm_jax.evaluation.records import EvaluationInputError, describe, field
from d2vlm_jax.evaluation.sentsim import UNAVAILABLE, SentenceSimilarity

TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")
THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
OVERALL_LABELS = ("RAR (Acc)", "EVC (Acc)", "RVQ (Acc)", "TVG (F1)", "EPM (F1)", "TAL (F1)",
                  "EVS (F1)", "VHD (F1)", "DVC (F1)", "DVC (Sim)", "SLC (F1)", "SLC (Sim)",
                  "TEM (Rec)", "GVQ (Rec)")
MERGED_LABELS = ("Acc(ref)", "F1(gnd)", "F1(cap)", "Sim(cap)", "Rec(com)")


@dataclass
class Context:
    """What a task evaluator may use besides its samples."""

    similarity: SentenceSimilarity | None
    tokenizer: coco_caption.CaptionTokenizer
    meteor: coco_caption.Meteor
    rng: Any
    delimiter: str
    notes: list


def round5(value):
    return None if value is None else round(value, 5)


def mean(values: Sequence):
    """``sum(values) / len(values)``; None if any value is None."""
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


# ------------------------------------------------------------------------- records

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_pair(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_number(v) for v in x)


def _pairs(x, allow_empty: bool) -> bool:
    return (isinstance(x, (list, tuple)) and (allow_empty or len(x) > 0)
            and all(_is_pair(p) for p in x))


def _bad(record, position, name, need):
    raise EvaluationInputError(f"{describe(record, position)}: field {name!r} must be {need}, "
                               f"got {record.get(name)!r}")


def validate(records: Sequence) -> None:
    """Every field the scripts read, in the shape they need (else their run would fail)."""
    for position, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise EvaluationInputError(f"record {position}: expected a JSON object, got "
                                       f"{type(record).__name__}")
        for name in ("task", "source", "idx", "a"):
            field(record, position, name)
        task = record["task"]
        if task not in TASKS:
            raise EvaluationInputError(f"{describe(record, position)}: unknown task {task!r} "
                                       f"(the scripts know {', '.join(TASKS)})")
        if not isinstance(record["a"], str):
            _bad(record, position, "a", "the answer text (a string)")
        try:
            hash(record["source"])
        except TypeError:
            _bad(record, position, "source", "a string")
        tgt = record.get("tgt")
        if task in ("tvg", "epm", "gvq"):
            field(record, position, "tgt")
            if not _is_pair(tgt):
                _bad(record, position, "tgt", "one interval [start, end]")
        elif task in ("tem", "tal", "dvc", "slc"):
            field(record, position, "tgt")
            if not _pairs(tgt, allow_empty=False):
                _bad(record, position, "tgt", "a non-empty list of intervals [start, end]")
        elif task == "evs":
            field(record, position, "tgt")
            if not _pairs(tgt, allow_empty=True):
                _bad(record, position, "tgt", "a list of intervals [start, end]")
        elif task == "vhd":
            field(record, position, "tgt")
            if not (_pairs(tgt, False) or (isinstance(tgt, (list, tuple)) and tgt
                                           and all(_pairs(a, False) for a in tgt))):
                _bad(record, position, "tgt", "a list of spans [start, end] or a list of such lists")
        if task in ("rar", "eca", "rvq", "gvq"):
            field(record, position, "p")
            options = field(record, position, "o")
            if not isinstance(options, (list, tuple)) or not 1 <= len(options) <= 5:
                _bad(record, position, "o", "a list of 1..5 options (the scripts label A-E)")
            if task == "gvq" and len(options) not in (4, 5):
                _bad(record, position, "o", "4 or 5 options (GVQ raises NotImplementedError otherwise)")
            for option in options:
                if isinstance(option, (list, tuple)) and len(option) < 2:
                    _bad(record, position, "o", "options that are text or [start, end]")
        if task in ("dvc", "slc"):
            field(record, position, "video")
            captions = field(record, position, "g")
            if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
                _bad(record, position, "g", "a list of caption strings")
            try:
                hash(record["video"])
            except TypeError:
                _bad(record, position, "video", "a path string")


def group(records: Sequence, subset: Mapping | None = None) -> dict[str, dict[Any, list]]:
    """``pred[task][source]``: samples in order, tasks and sources in order of first appearance.

    ``subset`` (E.T. Bench's ``subset.json``: task -> source -> [idx]; the scripts'
    ``--subset``) keeps only the listed samples; a source all of whose samples are left out
    stays, empty, as in the scripts (whose evaluators then divide by zero).
    """
    grouped: dict[str, dict[Any, list]] = {}
    for position, record in enumerate(records):
        samples = grouped.setdefault(record["task"], {}).setdefault(record["source"], [])
        if subset is not None:
            sources = subset.get(record["task"])
            if sources is None:
                raise EvaluationInputError(f"{describe(record, position)}: task not in the subset "
                                           "file (the scripts raise KeyError)")
            if record["source"] not in sources or record["idx"] not in sources[record["source"]]:
                continue
        samples.append(record)
    return grouped


def option_text(letter: str, option) -> str:
    """``"(A) option"``; an interval option is written ``"start - end"`` (Python ``str``)."""
    if isinstance(option, (list, tuple)):
        option = f"{option[0]} - {option[1]}"
    return f"({letter}) {option}"


def best_option(answer: str, options: Sequence, similarity: SentenceSimilarity) -> tuple[int, float]:
    """The SentSim fallback: ``similarity([answer], ["(X) option"])`` per option, one call
    each; the first strict maximum wins; ``(0, -inf)`` when no score beats -inf (no options,
    NaN scores)."""
    best, best_score = 0, float("-inf")
    for index, option in enumerate(options):
        score = float(similarity([answer], [option_text("ABCDE"[index], option)])[0])
        if score > best_score:
            best, best_score = index, score
    return best, best_score


# ------------------------------------------------------------------------- running

TaskEvaluator = Callable[[list, Context], dict]


def run(records: Sequence, evaluators: Mapping[str, TaskEvaluator], *, reproduces: str,
        similarity: SentenceSimilarity | None, tokenizer: str, rng_seed: int | None,
        delimiter: str, with_evi: bool, meteor: bool = True,
        subset: Mapping | None = None) -> dict[str, Any]:
    """Validates, groups, evaluates every (task, source) and summarizes like the scripts."""
    validate(records)
    notes: list[str] = []
    rng = random.Random(rng_seed) if rng_seed is not None else random
    grouped = group(records, subset)
    needs_captions = any(t in grouped for t in ("dvc", "slc"))
    meteor_scorer = coco_caption.Meteor() if needs_captions and meteor else None
    context = Context(similarity=similarity, tokenizer=coco_caption.CaptionTokenizer(tokenizer),
                      meteor=meteor_scorer, rng=rng, delimiter=delimiter, notes=notes)
    collected: dict[str, dict] = {}
    failures: list[str] = []
    try:
        for task, sources in grouped.items():
            for source, samples in sources.items():
                try:
                    if not samples and task != "evs":  # EVS alone divides only if it parsed some
                        raise ZeroDivisionError("no sample of this source is in the subset")
                    collected.setdefault(task, {})[source] = evaluators[task](samples, context)
                except (ScriptCrash, coco_caption.CiderCrash, ZeroDivisionError,
                        OverflowError) as error:
                    failures.append(f"{task}/{source}: {type(error).__name__}: {error}")
                    collected.setdefault(task, {})[source] = None
    finally:
        if meteor_scorer is not None:
            meteor_scorer.close()
    if similarity is None and any(t in grouped for t in ("rar", "eca", "rvq", "gvq", "dvc", "slc")):
        notes.append(UNAVAILABLE)
    if needs_captions and (meteor_scorer is None or not meteor_scorer.available):
        notes.append("METEOR not computed (off, or pycocoevalcap / java missing): reported as None")
    if needs_captions:
        notes.append(f"caption tokenizer: {context.tokenizer.backend}")
    if rng_seed is None and needs_captions:
        notes.append("unmatched captions were compared with random strings from the unseeded "
                     "global random module, as in the script (pass a seed to reproduce a run)")
    summary = summarize(collected, with_evi=with_evi)
    failures += summary.pop("failures")
    result = {"benchmark": "etbench", "reproduces": reproduces, **summary,
              "num_samples": len(records), "notes": notes,
              "script_failure": "; ".join(failures) if failures else None}
    return result


def _task_entry(sources: dict, score_key: str, score, extra: dict | None = None) -> dict:
    entry = {"sources": sources, "score": score, "score_key": score_key,
             "num_samples": sum(m["Total"] for m in sources.values() if m is not None)}
    entry.update(extra or {})
    return entry


def summarize(collected: dict, with_evi: bool) -> dict[str, Any]:
    """The scripts' report: task scores (``met``), the log's means, Overall and Merged rows."""
    met: list = []
    met_evi: list = []
    printed: dict[str, Any] = {}
    tasks_out: dict[str, Any] = {}
    failures: list[str] = []

    def values(task, key):
        return [d.get(key) if d is not None else None for d in collected[task].values()]

    def section(tasks, key, label, evi_key=None):
        present = [t for t in tasks if t in collected]
        if not present:
            return
        all_values, all_evi = [], []
        for task in present:
            task_values = values(task, key)
            all_values += task_values
            score = round5(mean(task_values))
            met.append(score)
            extra = {}
            if evi_key is not None:
                evi_values = values(task, evi_key)
                all_evi += evi_values
                # new_compute_metrics.py divides the running list of ALL grounding tasks'
                # F1_evi so far by this task's source count (reproduced).
                cumulative = None if any(v is None for v in all_evi) else sum(all_evi)
                met_evi.append(round5(None if cumulative is None else cumulative / len(evi_values)))
                extra["score_evi"] = met_evi[-1]
            tasks_out[task] = _task_entry(collected[task], key, score, extra)
        printed[f"Mean {label}"] = round5(mean(all_values))
        if evi_key is not None:
            printed[f"Mean {label}_evi"] = round5(mean(all_evi))

    section(("rar", "eca", "rvq"), "Acc", "Acc")
    section(("tvg", "epm", "tal", "evs", "vhd"), "F1", "F1", "F1_evi" if with_evi else None)

    present = [t for t in ("dvc", "slc") if t in collected]
    if present:
        all_f1, all_f1_evi, all_sim = [], [], []
        for task in present:
            f1s, sims = values(task, "F1"), values(task, "SentSim")
            all_f1 += f1s
            all_sim += sims
            met.append(round5(mean(f1s)))
            met.append(round5(mean(sims)))
            extra = {"sentsim": met[-1]}
            if with_evi:
                f1_evi = values(task, "F1_evi")
                all_f1_evi += f1_evi
                met_evi.append(round5(mean(f1_evi)))
                extra["score_evi"] = met_evi[-1]
            tasks_out[task] = _task_entry(collected[task], "F1", met[-2], extra)
        printed["Mean F1 (captioning)"] = round5(mean(all_f1))
        if with_evi:
            printed["Mean F1_evi (captioning)"] = round5(mean(all_f1_evi))
        printed["Mean SentSim"] = round5(mean(all_sim))

    present = [t for t in ("tem", "gvq") if t in collected]
    if present:
        for task in present:
            recs = values(task, "mRec")
            met.append(round5(mean(recs)))
            extra = {}
            if with_evi:
                met_evi.append(round5(mean(values(task, "mRec_evi"))))
                extra["score_evi"] = met_evi[-1]
            tasks_out[task] = _task_entry(collected[task], "mRec", met[-1], extra)
        if len(met) < 2:
            failures.append("summary: IndexError (met[-2] with fewer than 2 task scores)")
        else:
            printed["TEM Mean Rec"], printed["GVQ Mean Rec"] = met[-2], met[-1]
            if with_evi:
                printed["TEM Mean Rec_evi"], printed["GVQ Mean Rec_evi"] = met_evi[-2], met_evi[-1]

    overall = dict(zip(OVERALL_LABELS, met))
    printed["Overall"] = [None if m is None else str(round(m * 100, 1)) for m in met]
    merged: dict[str, Any] = {name: None for name in MERGED_LABELS}
    printed_merged: dict[str, Any] = {name: None for name in MERGED_LABELS}
    if len(met) < 12:
        failures.append(f"merged scores: IndexError (the script reads met[8..11] of {len(met)} "
                        "task scores: every E.T. Bench task must be present)")
    else:
        def total(items):
            return None if any(v is None for v in items) else sum(items)
        sums = {"Acc(ref)": (total(met[:3]), 3), "F1(gnd)": (total(met[3:8]), 5),
                "F1(cap)": (total([met[8], met[10]]), 2), "Sim(cap)": (total([met[9], met[11]]), 2),
                "Rec(com)": (total(met[12:]), 2)}
        for name, (value, count) in sums.items():
            merged[name] = None if value is None else value / count
            printed_merged[name] = None if value is None else str(round(value * 100 / count, 1))
    printed["Merged"] = printed_merged
    out = {"tasks": tasks_out, "overall": overall, "etbench_merged": merged, "printed": printed,
           "failures": failures}
    if with_evi:
        out["task_scores_evi"] = met_evi
    return out
