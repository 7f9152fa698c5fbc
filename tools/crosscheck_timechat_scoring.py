#!/usr/bin/env python
"""Crosscheck ``charades_timechat`` / ``youcook2_timechat`` against the authors' own scripts.

Runs the authors' ``convert_result_in_timechat_format.py`` and ``eval_in_timechat_format.py``
(Charades-STA and YouCook2) *unchanged*, from a copy of the user's clone of nusnlp/d2vlm, on
batches of random messy prediction records (``d2vlm_jax.evaluation.messy_answers``), and
compares with this project's protocols: the converted files entry by entry, and every
metric the eval scripts compute (the YouCook2 evaluator is loaded as a module so that its
unrounded per-video lists are read, not the 0.1-rounded print). Not part of CI.

Needs (none of it is in this repository):

* ``--authors_repo``: a clone of nusnlp/d2vlm (read-only; copied to ``--workdir``);
* ``--authors_python``: Python >= 3.12 (their Charades converter uses PEP 701 f-strings) with
  ``nncore`` (``pip install --no-deps nncore``), numpy, tabulate, termcolor, jsonlines,
  pyyaml, joblib, six, debugpy. PyTorch is *not* needed: the converters build tensors only
  for metrics they discard, and a small numpy stand-in for ``torch`` (written to the
  workdir) reproduces what matters there: ``torch.Tensor(None)`` raises TypeError;
* ``--jars``: a folder holding ``stanford-corenlp-3.4.1.jar``, ``meteor-1.5.jar`` and
  ``data/paraphrase-en.gz`` at any depth, e.g. an installed ``pycocoevalcap`` package
  (``pip install pycocoevalcap``), and Java.

Batches are drawn so that, by this project's reading, the authors' converter does not stop
(they would print nothing); ``--stopping_batches`` more batches each hold one record this
project says stops it, and the check there is that the authors' run does stop.

Example::

  python tools/crosscheck_timechat_scoring.py --authors_repo ~/src/d2vlm \\
      --authors_python /work/ref/venv_timechat/bin/python \\
      --jars /work/ref/venv_timechat/lib/python3.12/site-packages/pycocoevalcap \\
      --benchmark charades --batches 100 --batch_size 40

The Python PTB tokenizer alone is checked against the jar by
``tools/crosscheck_ptb_tokenizer.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from d2vlm_jax.evaluation import messy_timechat_records as messy_answers  # noqa: E402
from d2vlm_jax.evaluation.protocols import get as get_protocol  # noqa: E402
from d2vlm_jax.evaluation.protocols import timechat_charades, timechat_youcook2  # noqa: E402
from d2vlm_jax.evaluation.protocols.timechat_common import AuthorsStops  # noqa: E402

TORCH_STAND_IN = '''"""numpy stand-in for the few torch calls the authors' converters make (crosscheck only)."""
import numpy as _np


class Tensor:
    def __init__(self, data=None):
        if isinstance(data, Tensor):
            data = data.array
        if data is None or not hasattr(data, "__len__"):
            raise TypeError(f"new(): data must be a sequence (got {type(data).__name__})")
        with _np.errstate(over="ignore"):
            self.array = _np.asarray(data, dtype=_np.float32)

    @staticmethod
    def _wrap(array):
        out = Tensor.__new__(Tensor)
        out.array = _np.asarray(array, dtype=_np.float32)
        return out

    def __getitem__(self, key):
        return Tensor._wrap(self.array[key])

    def _other(self, other):
        return other.array if isinstance(other, Tensor) else other

    def __add__(self, other):
        return Tensor._wrap(self.array + self._other(other))

    def __sub__(self, other):
        return Tensor._wrap(self.array - self._other(other))

    def __truediv__(self, other):
        with _np.errstate(all="ignore"):
            return Tensor._wrap(self.array / self._other(other))

    def clamp(self, low):
        return Tensor._wrap(_np.where(self.array < low, low, self.array))

    def max(self):
        if self.array.size == 0:
            raise RuntimeError("max(): Expected reduction dim to be specified for input.numel() == 0")
        return Tensor._wrap(_np.max(self.array))

    def item(self):
        return float(self.array.reshape(-1)[0]) if self.array.size == 1 else \\
            (_ for _ in ()).throw(RuntimeError("item() on a tensor with several elements"))


def max(a, b):
    return Tensor._wrap(_np.maximum(a.array, b.array))


def min(a, b):
    return Tensor._wrap(_np.minimum(a.array, b.array))
'''

YOUCOOK2_DRIVER = '''"""Loads the authors' YouCook2 eval script as a module and prints its unrounded results."""
import importlib.util, json, math, os, sys
root, pred_file, gt_file, out_file = sys.argv[1:5]
os.chdir(root)
script = os.path.join(root, "all_benchmark_eval", "youcook2", "eval_in_timechat_format.py")
sys.path.insert(0, os.path.dirname(script))
spec = importlib.util.spec_from_file_location("authors_youcook2_eval", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
captured = {}
original_para = module.evaluate_para
def observed_para(*args):
    result = original_para(*args)
    captured.update(result)
    return result
module.evaluate_para = observed_para
results = module.eval_with_files(pred_file, gt_file)
means = {k: sum(v) / len(v) for k, v in results.items() if k != "key"}
means.update({k: float(v) for k, v in captured.items()})
with open(out_file, "w") as f:
    json.dump(means, f)
'''

TOKENIZER = ["stanford"]  # --our_tokenizer: the PTB tokenizer our YouCook2 side uses

PTB_JAR = "stanford-corenlp-3.4.1.jar"

CHARADES_PRINTED = {"R@0.3": r"IOU 0\.3: (\S+)", "R@0.5": r"IOU 0\.5: (\S+)",
                    "R@0.7": r"IOU 0\.7: (\S+)", "mIoU": r"mIOU: (\S+)"}


# What the authors' scripts raise at each of this project's stop reasons.
STOP_EXCEPTIONS = {"unreadable_number": "ValueError", "no_grounding_interval": "TypeError",
                   "failed_answer_without_index": "KeyError", "query_without_quote": "IndexError",
                   "zero_length_union": "ZeroDivisionError", "no_timestamp": "ZeroDivisionError",
                   "no_events": "ValueError", "parse_error": "ValueError"}


def find_file(root: str, name: str) -> str:
    for directory, _, files in os.walk(root):
        if name in files:
            return os.path.join(directory, name)
    raise FileNotFoundError(f"{name} not found under {root}")


class Authors:
    """A working copy of the authors' eval folders, with jars and the torch stand-in."""

    def __init__(self, repo: str, python: str, jars: str | None, workdir: str):
        self.python = python
        self.root = os.path.join(workdir, "authors")
        for benchmark in ("charades", "youcook2"):
            source = os.path.join(repo, "all_benchmark_eval", benchmark)
            if not os.path.isdir(source):
                raise SystemExit(f"{source} missing: --authors_repo must be a clone of nusnlp/d2vlm")
            shutil.copytree(source, os.path.join(self.root, "all_benchmark_eval", benchmark))
        shim = os.path.join(workdir, "shim", "torch")
        os.makedirs(shim)
        with open(os.path.join(shim, "__init__.py"), "w") as f:
            f.write(TORCH_STAND_IN)
        for sub in ("nn", "distributions"):  # imported by nncore.ops, never used here
            os.makedirs(os.path.join(shim, sub))
            with open(os.path.join(shim, sub, "__init__.py"), "w") as f:
                f.write("Gumbel = None\n" if sub == "distributions" else "")
        with open(os.path.join(shim, "nn", "functional.py"), "w") as f:
            f.write("")
        self.env = dict(os.environ, PYTHONPATH=os.path.join(workdir, "shim"))
        self.driver = os.path.join(workdir, "youcook2_driver.py")
        with open(self.driver, "w") as f:
            f.write(YOUCOOK2_DRIVER)
        self.ptb_jar = self.meteor_jar = None
        if jars:
            metrics = os.path.join(self.root, "all_benchmark_eval", "youcook2", "metrics")
            self.ptb_jar = find_file(jars, PTB_JAR)
            self.meteor_jar = find_file(jars, "meteor-1.5.jar")
            os.symlink(self.ptb_jar, os.path.join(metrics, PTB_JAR))
            os.symlink(self.meteor_jar, os.path.join(metrics, "meteor-1.5.jar"))
            os.makedirs(os.path.join(metrics, "data"), exist_ok=True)
            os.symlink(find_file(jars, "paraphrase-en.gz"),
                       os.path.join(metrics, "data", "paraphrase-en.gz"))

    def run(self, args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
        return subprocess.run([self.python] + args, cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def convert(self, benchmark: str, records: list[dict], batch_dir: str):
        """Their converter on ``records``: (converted dict or None, error line or None)."""
        pred_dir = os.path.join(batch_dir, "predictions")
        os.makedirs(pred_dir)
        with open(os.path.join(pred_dir, "etbench_0.json"), "w") as f:
            json.dump(records, f)
        done = self.run([f"all_benchmark_eval/{benchmark}/convert_result_in_timechat_format.py",
                         "--pred_path", pred_dir])
        converted = os.path.join(pred_dir, "result_converted.json")
        if done.returncode != 0 or not os.path.exists(converted):
            lines = (done.stderr or done.stdout).strip().splitlines()
            if lines and ("ImportError" in lines[-1] or "ModuleNotFoundError" in lines[-1]):
                raise SystemExit(f"--authors_python lacks a module: {lines[-1]}")
            return None, lines[-1] if lines else f"exit {done.returncode}"
        with open(converted) as f:
            return json.load(f), None

    def charades_eval(self, converted_file: str, gt_file: str) -> dict:
        done = self.run(["all_benchmark_eval/charades/eval_in_timechat_format.py",
                         "--pred_file", converted_file, "--gt_file", gt_file])
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1]}
        return {name: float(re.search(pattern, done.stdout).group(1))
                for name, pattern in CHARADES_PRINTED.items()}

    def youcook2_eval(self, converted_file: str, gt_file: str, out_file: str) -> dict:
        done = self.run([self.driver, self.root, converted_file, gt_file, out_file])
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1]}
        with open(out_file) as f:
            return json.load(f)


def charades_gt_file(records: list[dict], path: str) -> None:
    first = {}
    for r in records:  # one annotation per query, as in TimeChat's file
        first.setdefault(r["idx"], r)
    annotations = [{"id": r["idx"], "image_id": r["video"].split("/")[-1],
                    "caption": r["q"].split("'")[1] if "'" in r["q"] else "", "timestamp": r["tgt"]}
                   for r in first.values()]
    with open(path, "w") as f:
        json.dump({"annotations": annotations}, f)


def youcook2_gt_file(records: list[dict], path: str) -> None:
    first = {}
    for r in records:  # one annotation per video, as in TimeChat's file
        first.setdefault(r["video"], r)
    annotations = [{"image_id": r["video"].split("/")[-1], "segments": r["tgt"],
                    "pure_cap": ". ".join(r["g"]), "duration": r["duration"]}
                   for r in first.values()]
    with open(path, "w") as f:
        json.dump({"annotations": annotations}, f)


def converter_stop_reason(benchmark: str, record: dict) -> str | None:
    """The reason this project says the authors' converter stops on this record, or None."""
    stops = AuthorsStops("crosscheck", strict=False)
    module = timechat_charades if benchmark == "charades" else timechat_youcook2
    module.convert([record], stops)
    return next(iter(stops.counts), None)


# Converter stops the messy generator produces, cycled through by the stopping batches.
GENERATED_STOPS = {"charades": ("no_grounding_interval", "unreadable_number",
                                "failed_answer_without_index"),
                   "youcook2": ("no_events", "parse_error")}


def crafted_stop(benchmark: str, reason: str, records: list[dict]) -> list[dict]:
    """A batch made to stop the authors' scripts at ``reason`` (those the generator lacks)."""
    records = [dict(r) for r in records]
    if reason == "query_without_quote":
        records[0]["q"] = "find the event"
        records[0]["a"] = "1 - 2</evi>3 - 4"
    elif reason == "zero_length_union":
        records[0].update(tgt=[5, 5], a="5 - 5</evi>5 - 5")
    elif reason == "no_timestamp":
        for r in records:
            r.update(a="no idea", index=r["idx"])
    return records


def draw_batch(benchmark: str, rng: random.Random, size: int, start: int,
               stop_reason: str | None) -> list[dict]:
    """``size`` records none of which stops the converter, or exactly one stopping at
    ``stop_reason`` (a reason the generator produces; others are crafted afterwards)."""
    make = (messy_answers.charades_records if benchmark == "charades"
            else messy_answers.youcook2_records)
    wanted = stop_reason if stop_reason in GENERATED_STOPS[benchmark] else None
    kept, bad = [], None
    n = start
    while len(kept) < size - (wanted is not None) or (wanted and bad is None):
        record = (make(rng, 1, start_idx=n, with_index=0.7) if benchmark == "charades"
                  else make(rng, 1, start_idx=n))[0]
        n += 1
        reason = converter_stop_reason(benchmark, record)
        if reason is None:
            if len(kept) < size - (wanted is not None):
                kept.append(record)
        elif reason == wanted and bad is None:
            bad = record
    if wanted:
        kept.insert(rng.randrange(len(kept) + 1), bad)
    elif stop_reason:
        kept = crafted_stop(benchmark, stop_reason, kept)
    elif rng.random() < 0.4:
        kept = with_duplicates(benchmark, rng, kept)
    return kept


def with_duplicates(benchmark: str, rng: random.Random, records: list[dict]) -> list[dict]:
    """Adds later records for the same query / video (a new answer), and for Charades failed
    answers whose ``index`` names another record's ``idx`` (JSON key collisions)."""
    records = list(records)
    for _ in range(rng.randint(1, 3)):
        original = rng.choice(records)
        copy = dict(original)
        if benchmark == "charades":
            copy["a"] = messy_answers.grounding_answer(rng)
            if rng.random() < 0.5:
                copy.update(a="no idea", idx=10 ** 7 + rng.randrange(10 ** 6),
                            index=original["idx"])
        else:
            copy["a"] = messy_answers.dense_answer(rng)
        if converter_stop_reason(benchmark, copy) is None:
            records.insert(rng.randrange(len(records) + 1), copy)
    return records


def compare(ours: dict, theirs: dict, names) -> dict[str, float]:
    """Absolute differences per metric (inf where one side lacks a value)."""
    diffs = {}
    for name in names:
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None:
            diffs[name] = 0.0 if a is None and b is None else float("inf")
        else:
            diffs[name] = abs(float(a) - float(b))
    return diffs


def check_batch(benchmark: str, authors: Authors, records: list[dict], batch_dir: str,
                stopping: bool) -> dict:
    """Runs both sides on one batch; returns a summary with the per-metric differences."""
    theirs_converted, error = authors.convert(benchmark, records, batch_dir)
    strict_error = None
    try:
        get_protocol(f"{benchmark}_timechat").score(records, strict=True, tokenizer=TOKENIZER[0])
    except Exception as exc:  # noqa: BLE001 - any stop counts
        strict_error = f"{type(exc).__name__}: {exc}"
    summary = {"records": len(records), "authors_stopped": error, "we_stop": strict_error}
    gt_file = os.path.join(batch_dir, "test.caption_coco_format.json" if benchmark == "charades"
                           else "val.caption_coco_format.json")
    converted_file = os.path.join(batch_dir, "predictions", "result_converted.json")
    if benchmark == "charades":
        charades_gt_file(records, gt_file)
    else:
        youcook2_gt_file(records, gt_file)
    if error is None and (strict_error is not None or benchmark == "charades"):
        # Eval-level stops (IoU 0/0, no timestamp at all) show in their eval script.
        if benchmark == "charades":
            theirs = authors.charades_eval(converted_file, gt_file)
        else:
            theirs = authors.youcook2_eval(converted_file, gt_file,
                                           os.path.join(batch_dir, "authors_metrics.json"))
        error = theirs.get("error")
        summary["authors_stopped"] = error
    if stopping or error or strict_error:
        summary["stop_agrees"] = (error is not None) == (strict_error is not None)
        summary["reason"] = re.search(r"\((\w+)\)", strict_error).group(1) if strict_error else None
        if error and strict_error:
            reason = re.search(r"\((\w+)\)", strict_error).group(1)
            summary["reason_agrees"] = error.startswith(STOP_EXCEPTIONS.get(reason, "?"))
        return summary

    if benchmark == "charades":
        ours_converted, _ = timechat_charades.convert(records, AuthorsStops("x", True))
        theirs_ts = {k: v.get("timestamp") if isinstance(v, dict) else v
                     for k, v in theirs_converted.items()}
        ours_ts = {k: v.get("timestamp") if isinstance(v, dict) else v
                   for k, v in ours_converted.items()}
        summary["converted_equal"] = list(theirs_ts.items()) == list(ours_ts.items())
        ours = get_protocol("charades_timechat").score(records, ground_truth=gt_file, strict=True)
        ours_records_gt = get_protocol("charades_timechat").score(records, strict=True)
        names = list(CHARADES_PRINTED)
        summary["records_gt_equal"] = all(ours[n] == ours_records_gt[n] for n in names)
    else:
        ours_converted, _ = timechat_youcook2.convert(records, AuthorsStops("x", True))
        summary["converted_equal"] = ours_converted == theirs_converted
        theirs = authors.youcook2_eval(converted_file, gt_file,
                                       os.path.join(batch_dir, "authors_metrics.json"))
        ours = get_protocol("youcook2_timechat").score(
            records, ground_truth=gt_file, strict=True, meteor_jar=authors.meteor_jar,
            ptb_jar=authors.ptb_jar, tokenizer=TOKENIZER[0])
        names = sorted(k for k in theirs if k != "error")
    if "error" in theirs:
        summary["authors_eval_error"] = theirs["error"]
        return summary
    summary["diffs"] = compare(ours, theirs, names)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors_repo", help="clone of nusnlp/d2vlm")
    parser.add_argument("--authors_python", default=sys.executable,
                        help="Python >= 3.12 with nncore & co. (see the module docstring)")
    parser.add_argument("--jars", help="folder holding the PTB and METEOR jars (pycocoevalcap)")
    parser.add_argument("--benchmark", choices=("charades", "youcook2", "both"), default="both")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=40)
    parser.add_argument("--stopping_batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="kept for inspection (default: a temporary folder)")
    parser.add_argument("--our_tokenizer", choices=("stanford", "python"), default="stanford",
                        help="PTB tokenizer of this project's YouCook2 side (the authors' side "
                             "always runs the jar)")
    args = parser.parse_args(argv)

    TOKENIZER[0] = args.our_tokenizer
    if not args.authors_repo:
        parser.error("--authors_repo is required")
    workdir = args.workdir or tempfile.mkdtemp(prefix="timechat_crosscheck_")
    os.makedirs(workdir, exist_ok=True)
    authors = Authors(args.authors_repo, args.authors_python, args.jars, workdir)
    benchmarks = ("charades", "youcook2") if args.benchmark == "both" else (args.benchmark,)
    if "youcook2" in benchmarks and not args.jars:
        parser.error("youcook2 needs --jars (their evaluator asserts both jars exist)")
    failures = 0
    for benchmark in benchmarks:
        rng = random.Random(f"{args.seed}-{benchmark}")
        max_diff: dict[str, float] = {}
        records_total = ok_batches = converted_equal = stop_agree = 0
        stop_reasons: dict[str, int] = {}
        start = time.time()
        total = args.batches + args.stopping_batches
        reasons = GENERATED_STOPS[benchmark] + (
            ("query_without_quote", "zero_length_union", "no_timestamp")
            if benchmark == "charades" else ())
        for b in range(total):
            stopping = b >= args.batches
            reason = reasons[(b - args.batches) % len(reasons)] if stopping else None
            records = draw_batch(benchmark, rng, args.batch_size, b * 10 * args.batch_size,
                                 reason)
            batch_dir = os.path.join(workdir, benchmark, f"batch{b:04d}")
            os.makedirs(batch_dir)
            summary = check_batch(benchmark, authors, records, batch_dir, stopping)
            with open(os.path.join(batch_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            if "stop_agrees" in summary:
                stop_reasons[str(summary.get("reason"))] = stop_reasons.get(str(summary.get("reason")), 0) + 1
                stop_agree += summary["stop_agrees"] and summary.get("reason_agrees", True)
                if not summary["stop_agrees"] or not summary.get("reason_agrees", True) \
                        or not stopping:
                    failures += 1
                    print(f"{benchmark} batch {b}: stop disagreement or unexpected stop: "
                          f"authors {summary['authors_stopped']!r}, ours {summary['we_stop']!r}")
                continue
            if "diffs" not in summary:
                failures += 1
                print(f"{benchmark} batch {b}: {summary}")
                continue
            ok_batches += 1
            records_total += len(records)
            converted_equal += summary["converted_equal"]
            if not summary["converted_equal"] or not summary.get("records_gt_equal", True):
                failures += 1
                print(f"{benchmark} batch {b}: converted files differ or GT sources disagree")
            for name, d in summary["diffs"].items():
                max_diff[name] = max(max_diff.get(name, 0.0), d)
                if d > 1e-6:
                    failures += 1
                    print(f"{benchmark} batch {b}: {name} differs by {d}")
        worst = max(max_diff.values()) if max_diff else float("nan")
        print(f"{benchmark}: {ok_batches} scored batches ({records_total} records), converted "
              f"files equal in {converted_equal}; {len(max_diff)} metrics, max |diff| {worst:.3g}; "
              f"stops agree (same exception) in {stop_agree}/{total - ok_batches} batches "
              f"{stop_reasons}; "
              f"{time.time() - start:.0f} s")
        for name in sorted(max_diff):
            print(f"  {name:<16} max |diff| {max_diff[name]:.3g}")
    print(f"workdir: {workdir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
