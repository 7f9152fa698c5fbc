r"""Scores an existing predictions file under a named protocol; no model, no accelerator.

Examples:
  # predictions made by the authors' PyTorch release (a directory of etbench_<i>.json files)
  python launch/score.py --protocol d2vlm --predictions /ckpt/d2vlm/etbench --output metrics.json
  # the official E.T. Bench script's rules, on one JSON list
  python launch/score.py --protocol etbench --predictions preds.json --sentsim minilm
  # predictions written by launch/evaluate.py (benchmark_records.json)
  python launch/score.py --protocol d2vlm_jax --predictions eval_etbench/benchmark_records.json
  # the authors' TimeChat-format Charades-STA / YouCook2 pipelines (PyTorch release output)
  python launch/score.py --protocol charades_timechat --predictions /ckpt/d2vlm/charades \
      --ground_truth TimeIT/data/temporal_video_grounding/charades/test.caption_coco_format.json
  python launch/score.py --protocol youcook2_timechat --predictions /ckpt/d2vlm/youcook2 \
      --ground_truth TimeIT/data/dense_video_captioning/youcook2/val.caption_coco_format.json

Protocols (docs/EVALUATION.md compares them): etbench, etbench_strict_rvq, d2vlm,
d2vlm_looser (the authors' scripts, exactly), d2vlm_jax (the project's own rules),
charades_timechat and youcook2_timechat (the authors' TimeChat-format Charades-STA / YouCook2
converter + eval scripts, exactly).

A predictions file is a JSON list (or JSON Lines) of records in the E.T. Bench layout
(``idx``, ``task``, ``source``, ``video``, ground truth ``tgt`` / ``o`` / ``p`` / ``g``, and
``a``: the raw answer text), or a directory of such files, read as the protocol's script
reads it. Prints a table; --output writes metrics.json (protocol, sample counts, every
metric). Exit 2 with a one-line error for unusable input.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_PROTOCOL = flags.DEFINE_string("protocol", None, "Scoring protocol (see docs/EVALUATION.md).")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "Predictions file (.json / .jsonl) or directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write metrics.json (default: print only).")
_SENTSIM = flags.DEFINE_string("sentsim", "auto", "Sentence similarity: auto (all-MiniLM-L6-v2 when "
                               "installed), minilm (required), none.")
_TOKENIZER = flags.DEFINE_string("caption_tokenizer", "auto", "PTB tokenizer for caption metrics: auto, "
                                 "stanford (pycocoevalcap's jar + java), python.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the random strings the authors' scripts compare "
                             "unmatched captions with (default: unseeded, as the scripts).")
_DELIMITER = flags.DEFINE_string("delimiter", None, "D²VLM protocols: grounding/answer delimiter "
                                 "(v2 = 'Answer: ', v3 = '</evi>', the default, or literal text).")
_SUBSET = flags.DEFINE_string("subset", None, "E.T. Bench subset.json (task -> source -> [idx]): score only "
                              "those samples, like the scripts' --subset.")
_METEOR = flags.DEFINE_boolean("meteor", True, "Compute METEOR (java + pycocoevalcap; slow to start).")
_GROUND_TRUTH = flags.DEFINE_string("ground_truth", None, "TimeChat-format protocols: the TimeChat "
                                    "caption_coco_format.json their eval script compares with "
                                    "(default: the records' own tgt / g).")
_METEOR_JAR = flags.DEFINE_string("meteor_jar", None, "A meteor-1.5.jar (with data/paraphrase-en.gz "
                                  "beside it) for METEOR; default: pycocoevalcap's, if installed.")
_PTB_JAR = flags.DEFINE_string("ptb_jar", None, "A stanford-corenlp-3.4.1.jar for the PTB tokenizer "
                               "(TimeChat-format protocols); default: pycocoevalcap's, if installed.")
_STRICT = flags.DEFINE_boolean("strict", False, "TimeChat-format protocols: fail where the authors' "
                               "scripts stop with an exception, instead of the documented repair.")
flags.mark_flags_as_required(["protocol", "predictions"])


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from d2vlm_jax.evaluation import records as records_lib
    from d2vlm_jax.evaluation import scoring
    from d2vlm_jax.evaluation.protocols.timechat_common import AuthorsScriptWouldStop

    try:
        protocol = scoring.get_protocol(_PROTOCOL.value)
        if _TOKENIZER.value not in ("auto", "stanford", "python"):
            raise scoring.ScoringError(f"--caption_tokenizer must be auto, stanford or python, got "
                                       f"{_TOKENIZER.value!r}")
        records = records_lib.load_predictions(_PREDICTIONS.value, keep=protocol.keep_file)
        similarity, similarity_name = None, "not needed (no multiple-choice or caption task)"
        if scoring.needs_similarity(records):
            similarity, similarity_name = scoring.resolve_similarity(_SENTSIM.value)
        subset = None
        if _SUBSET.value:
            try:
                with open(_SUBSET.value) as f:
                    subset = json.load(f)
            except (OSError, json.JSONDecodeError) as error:
                raise scoring.ScoringError(f"--subset {_SUBSET.value}: {error}") from None
        options = {"tokenizer": _TOKENIZER.value, "subset": subset, "random_seed": _SEED.value, "delimiter": _DELIMITER.value,
                   "meteor": _METEOR.value}
        extra = {"ground_truth": _GROUND_TRUTH.value, "meteor_jar": _METEOR_JAR.value,
                 "ptb_jar": _PTB_JAR.value, "strict": _STRICT.value or None}
        options.update({k: v for k, v in extra.items() if v is not None})
        document = scoring.score_records(records, protocol.name, similarity=similarity,
                                         similarity_name=similarity_name, **options)
    except (scoring.ScoringError, records_lib.EvaluationInputError, ValueError,
            AuthorsScriptWouldStop) as error:
        fail(f"{_PREDICTIONS.value}: {error}" if isinstance(error, records_lib.EvaluationInputError)
             and not str(error).startswith(_PREDICTIONS.value) else str(error))
    document["predictions"] = os.path.abspath(_PREDICTIONS.value)
    if _SUBSET.value:
        document["options"]["subset"] = os.path.abspath(_SUBSET.value)
    print(scoring.format_table(document), flush=True)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(document, f, indent=2, default=float)
        print(f"metrics: {_OUTPUT.value}", flush=True)


if __name__ == "__main__":
    app.run(main)
