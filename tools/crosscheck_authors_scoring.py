r"""Crosscheck: the authors' E.T. Bench scoring scripts, run unchanged, against our protocols.

For each protocol (``etbench``, ``etbench_strict_rvq``, ``d2vlm``, ``d2vlm_looser``) and each
round: random messy prediction records (``d2vlm_jax.evaluation.messy_records``) are written
as a predictions directory; the authors' script is copied to a work directory and run on it
UNCHANGED by a reference Python; our protocol scores the same directory; every number the
script writes (metrics.json: every metric of every task and source) or prints (the Mean
lines, the Overall and Merged rows) is compared. Exit 1 on any disagreement.

What the reference Python needs (the scripts' imports; none of their code is here):
Python >= 3.12 (``new_compute_metrics.py`` nests quotes in an f-string), torch, numpy,
nncore (``pip install nncore --no-deps`` plus h5py jsonlines pyyaml requests termcolor
joblib tabulate), tabulate, pycocoevalcap (and ``java`` on PATH). ``sentence_transformers``
is NOT needed: a shim module replaces it by a deterministic stand-in similarity (written
to the work directory), and our side is given the same function, so SentSim and the
multiple-choice fallback are compared without the MiniLM model.

``new_compute_metircs_looser.py`` as shipped cannot start (``--pred_path`` is declared twice:
argparse raises); the wrapper makes argparse resolve the conflict.

The scripts call ``PTBTokenizer(verbose=False)`` (the E.T. Bench kit's pycocoevalcap); the
wrapper lets PyPI's pycocoevalcap 1.2 (no arguments, same tokenization) accept it.

Determinism: the scripts compare unmatched captions with strings from the global,
unseeded ``random`` module, and visit videos in ``list(set(...))`` order. The harness
seeds ``random`` (a two-line wrapper runs the script with ``runpy``) and fixes
``PYTHONHASHSEED`` on both sides, and our side gets the same seed.

Example (takes minutes: the caption metrics start java many times):
  python tools/crosscheck_authors_scoring.py --authors_repo ~/src/d2vlm \
      --python ~/venvs/etbench312/bin/python --per_task 1000 --rounds 1
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCRIPTS = {
    "etbench": ("compute_metrics_original_etchat.py", "metrics.log"),
    "etbench_strict_rvq": ("compute_metrics_original_etchat_strict_rvq.py", "metrics.log"),
    "d2vlm": ("new_compute_metrics.py", "metrics2.log"),
    "d2vlm_looser": ("new_compute_metircs_looser.py", "metrics2_rvq_looser.log"),
}

STANDIN_SIMILARITY = r'''
"""Deterministic stand-in for all-MiniLM-L6-v2 similarity (crosscheck only).

Character-trigram Jaccard (case-folded) plus a hash term of the exact, ordered pair, so the
score depends on argument order and letter case (as a real model's would not, which makes
such slips visible); rounded to float32 (what dot_score returns)."""
import hashlib
import os
import struct

COARSE = os.environ.get("STANDIN_SIMILARITY") == "coarse"


def _f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def _grams(text):
    text = f"  {text.lower()} "
    return {text[i:i + 3] for i in range(len(text) - 2)}


def pair_similarity(a, b):
    ga, gb = _grams(a), _grams(b)
    jaccard = len(ga & gb) / len(ga | gb) if ga | gb else 0.0
    digest = hashlib.md5((a + "\x00" + b).encode("utf-8", "surrogatepass")).hexdigest()
    value = 0.8 * jaccard + 0.2 * int(digest[:8], 16) / 2 ** 32
    return _f32(round(value, 1) if COARSE else value)


def similarity(texts_a, texts_b):
    return [pair_similarity(a, b) for a, b in zip(texts_a, texts_b)]
'''

SHIM_INIT = r'''
"""Shim of sentence_transformers for the crosscheck: encode() keeps the sentences, the
similarity comes from standin_similarity (see util.dot_score)."""
from . import util  # noqa: F401


class SentenceTransformer:
    def __init__(self, *args, **kwargs):
        pass

    def encode(self, sentences, *args, **kwargs):
        return list(sentences)
'''

SHIM_UTIL = r'''
import torch
from standin_similarity import pair_similarity


def dot_score(a, b):
    return torch.tensor([[pair_similarity(x, y) for y in b] for x in a], dtype=torch.float32)
'''

# The E.T. Bench kit's pycocoevalcap takes PTBTokenizer(verbose=...); PyPI's 1.2 takes no
# argument and tokenizes identically: accept (and ignore) the keyword. Then seed `random`
# and run the unchanged script as __main__.
# new_compute_metircs_looser.py declares --pred_path twice and stops in parse_args as
# shipped: argparse is told to resolve the conflict (the later declaration wins; we pass
# --pred_path anyway). The script files themselves are run unchanged.
RUN_SCRIPT = ("import argparse, random, runpy, sys\n"
              "_init = argparse.ArgumentParser.__init__\n"
              "def _resolving_init(self, *args, **kwargs):\n"
              "    kwargs.setdefault('conflict_handler', 'resolve')\n"
              "    _init(self, *args, **kwargs)\n"
              "argparse.ArgumentParser.__init__ = _resolving_init\n"
              "import pycocoevalcap.tokenizer.ptbtokenizer as ptb\n"
              "class PTBTokenizer(ptb.PTBTokenizer):\n"
              "    def __init__(self, verbose=True):\n"
              "        super().__init__()\n"
              "ptb.PTBTokenizer = PTBTokenizer\n"
              "random.seed(int(sys.argv[1]))\n"
              "sys.argv = [sys.argv[2], '--pred_path', sys.argv[3]]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")

RUN_OURS = r'''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("standin_similarity", sys.argv[1])
standin = importlib.util.module_from_spec(spec); spec.loader.exec_module(standin)
from d2vlm_jax.evaluation import protocols, records
protocol = protocols.get(sys.argv[2])
data = records.load_predictions(sys.argv[3], keep=protocol.keep_file)
result = protocols.score(sys.argv[2], data, sentence_similarity=standin.similarity,
                         tokenizer=sys.argv[5], random_seed=int(sys.argv[4]))
json.dump(result, open(sys.argv[6], "w"))
'''


def write_shims(directory: str) -> str:
    os.makedirs(os.path.join(directory, "sentence_transformers"), exist_ok=True)
    with open(os.path.join(directory, "standin_similarity.py"), "w") as f:
        f.write(STANDIN_SIMILARITY)
    with open(os.path.join(directory, "sentence_transformers", "__init__.py"), "w") as f:
        f.write(SHIM_INIT)
    with open(os.path.join(directory, "sentence_transformers", "util.py"), "w") as f:
        f.write(SHIM_UTIL)
    return os.path.join(directory, "standin_similarity.py")


def parse_log(path: str) -> dict:
    """The numbers a script prints: Mean lines (in order), the Overall and Merged rows."""
    lines = open(path).read().splitlines()
    printed: dict = {"means": []}
    for i, line in enumerate(lines):
        for prefix in ("Mean Acc:", "Mean F1:", "Mean F1_evi:", "Mean SentSim:", "TEM Mean Rec:",
                       "GVQ Mean Rec:", "TEM Mean Rec_evi:", "GVQ Mean Rec_evi:"):
            if line.startswith(prefix):
                printed["means"].append((prefix[:-1], float(line[len(prefix):])))
        if line.strip() in ("Overall", "Merged"):
            rows = [r for r in lines[i + 1:i + 7] if r.strip() and not set(r.strip()) <= {"-", " "}]
            printed[line.strip()] = rows[1].split()
    return printed


def our_printed_means(result: dict) -> list:
    p = result["printed"]
    out = []
    order = [("Mean Acc", "Mean Acc"), ("Mean F1", "Mean F1"), ("Mean F1_evi", "Mean F1_evi"),
             ("Mean F1", "Mean F1 (captioning)"), ("Mean F1_evi", "Mean F1_evi (captioning)"),
             ("Mean SentSim", "Mean SentSim"), ("TEM Mean Rec", "TEM Mean Rec"),
             ("TEM Mean Rec_evi", "TEM Mean Rec_evi"), ("GVQ Mean Rec", "GVQ Mean Rec"),
             ("GVQ Mean Rec_evi", "GVQ Mean Rec_evi")]
    for label, key in order:
        if key in p:
            out.append((label, p[key]))
    return out


def same(a, b, tolerance: float) -> tuple[bool, float]:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b, 0.0
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b), 0.0
        if math.isinf(a) or math.isinf(b):
            return a == b, 0.0
        return abs(a - b) <= tolerance, abs(a - b)
    return a == b, 0.0


def compare(theirs: dict, printed: dict, ours: dict, tolerance: float) -> tuple[int, float, list]:
    """Every metric of the script's output against ours: (compared, max |diff|, mismatches)."""
    compared, worst, bad = 0, 0.0, []
    for task, sources in theirs.items():
        for source, metrics in sources.items():
            mine = ours["tasks"].get(task, {}).get("sources", {}).get(source)
            for key, value in metrics.items():
                compared += 1
                other = None if mine is None else mine.get(key, "<missing>")
                ok, diff = same(value, other, tolerance)
                worst = max(worst, diff)
                if not ok:
                    bad.append(f"{task}/{source}/{key}: script {value!r}, ours {other!r}")
    means = sorted(printed["means"])
    mine = sorted(our_printed_means(ours))
    if [m[0] for m in means] != [m[0] for m in mine]:
        bad.append(f"printed mean lines differ: script {means}, ours {mine}")
    for (label, value), (_, other) in zip(means, mine):
        compared += 1
        ok, diff = same(value, other, tolerance)
        worst = max(worst, diff)
        if not ok:
            bad.append(f"log {label}: script {value!r}, ours {other!r}")
    for row in ("Overall", "Merged"):
        theirs_row = printed.get(row)
        mine_row = ours["printed"][row]
        mine_row = list(mine_row.values()) if isinstance(mine_row, dict) else mine_row
        compared += len(theirs_row or [])
        if theirs_row != mine_row:
            bad.append(f"log {row}: script {theirs_row}, ours {mine_row}")
    return compared, worst, bad


def run_ours(args, protocol, preds, seed, env, standin, run_dir) -> tuple[dict, float]:
    ours_path = os.path.join(run_dir, "ours.json")
    start = time.time()
    out = subprocess.run([args.our_python, "-c", RUN_OURS, standin, protocol, preds, str(seed),
                          args.caption_tokenizer, ours_path], env=dict(env, PYTHONPATH=ROOT),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"our protocol {protocol} failed:\n{out.stderr[-3000:]}")
    return json.load(open(ours_path)), round(time.time() - start, 1)


def run_round(args, protocol: str, round_index: int, workdir: str, standin: str) -> dict:
    script_name, log_name = SCRIPTS[protocol]
    seed = args.seed * 1000 + round_index
    rng = random.Random(seed)
    from d2vlm_jax.evaluation.messy_records import messy_records
    records = messy_records(rng, per_task=args.per_task, sources=args.sources, crashers=args.crashers)
    run_dir = os.path.join(workdir, f"{protocol}_round{round_index}")
    preds = os.path.join(run_dir, "etbench")
    os.makedirs(preds, exist_ok=True)
    half = len(records) // 2
    for k, chunk in enumerate((records[:half], records[half:])):
        with open(os.path.join(preds, f"etbench_{k}.json"), "w") as f:
            json.dump(chunk, f)
    script = os.path.join(run_dir, script_name)
    shutil.copy(os.path.join(args.authors_repo, "all_benchmark_eval", "etbench", script_name), script)
    env = dict(os.environ, PYTHONHASHSEED=str(args.hash_seed),
               PYTHONPATH=os.path.dirname(standin), STANDIN_SIMILARITY=args.similarity)
    start = time.time()
    out = subprocess.run([args.python, "-c", RUN_SCRIPT, str(seed), script, preds], env=env,
                         cwd=run_dir, capture_output=True, text=True)
    script_seconds = time.time() - start
    script_failed = out.returncode != 0
    if script_failed and not args.crashers:
        raise RuntimeError(f"{script_name} failed:\n{out.stderr[-3000:]}")
    if script_failed:  # --crashers: our protocol must report a failure too
        ours = run_ours(args, protocol, preds, seed, env, standin, run_dir)[0]
        error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"
        bad = [] if ours.get("script_failure") else [f"the script failed ({error}), ours did not"]
        return {"protocol": protocol, "round": round_index, "records": len(records),
                "metrics_compared": 1, "max_abs_diff": 0.0, "mismatches": bad,
                "script_seconds": round(script_seconds, 1), "our_seconds": 0.0,
                "script_error": error, "our_failure": ours.get("script_failure")}
    if protocol.startswith("etbench"):
        metrics_path = os.path.join(preds, "metrics.json")
    else:
        debug = os.path.join(preds, "eval_results_debug")
        metrics_path = os.path.join(debug, os.listdir(debug)[0])
    theirs = json.load(open(metrics_path))
    printed = parse_log(os.path.join(preds, log_name))
    # our side reads the same directory (the official script wrote metrics.json into it,
    # which its listing rule -- and so our protocol -- skips)
    ours, our_seconds = run_ours(args, protocol, preds, seed, env, standin, run_dir)

    compared, worst, bad = compare(theirs, printed, ours, args.tolerance)
    if ours.get("script_failure"):
        bad.append(f"ours reports a script failure the script did not have: {ours['script_failure']}")
    return {"protocol": protocol, "round": round_index, "records": len(records),
            "metrics_compared": compared, "max_abs_diff": worst, "mismatches": bad,
            "script_seconds": round(script_seconds, 1), "our_seconds": round(our_seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors_repo", required=True, help="a clone of nusnlp/d2vlm")
    parser.add_argument("--python", default="python3", help="reference interpreter (see module doc)")
    parser.add_argument("--our_python", default=sys.executable, help="interpreter for our side")
    parser.add_argument("--protocols", default=",".join(SCRIPTS))
    parser.add_argument("--per_task", type=int, default=200, help="records per task and round")
    parser.add_argument("--sources", type=int, default=2, help="sources per task")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hash_seed", type=int, default=0, help="PYTHONHASHSEED of both sides")
    parser.add_argument("--similarity", choices=("fine", "coarse"), default="fine",
                        help="stand-in similarity; coarse rounds to 0.1 (many ties)")
    parser.add_argument("--caption_tokenizer", choices=("stanford", "python"), default="stanford")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--crashers", action="store_true",
                        help="include inputs that crash the scripts; a crash must be reported by "
                        "our protocol as script_failure (use a small --per_task)")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--report", default=None, help="write the per-round results as JSON")
    args = parser.parse_args()
    for name in args.protocols.split(","):
        script = os.path.join(args.authors_repo, "all_benchmark_eval", "etbench", SCRIPTS[name][0])
        if not os.path.isfile(script):
            print(f"error: {script} not found (is --authors_repo a clone of nusnlp/d2vlm?)", file=sys.stderr)
            return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="crosscheck_")
    standin = write_shims(os.path.join(workdir, "shims"))
    results, failed = [], False
    for name in args.protocols.split(","):
        for k in range(args.rounds):
            result = run_round(args, name, k, workdir, standin)
            results.append(result)
            status = "AGREE" if not result["mismatches"] else f"{len(result['mismatches'])} MISMATCHES"
            print(f"{name:<20} round {k}: {result['records']} records, {result['metrics_compared']} "
                  f"numbers compared, max |diff| {result['max_abs_diff']:.3g}: {status} "
                  f"(script {result['script_seconds']} s, ours {result['our_seconds']} s)", flush=True)
            for line in result["mismatches"][:15]:
                print(f"    {line}")
            failed |= bool(result["mismatches"])
    if args.report:
        with open(args.report, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
