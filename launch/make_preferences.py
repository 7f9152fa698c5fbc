r"""Synthesizes factorized preference data (SPEC §4.3) from a ground-truth annotation file.

Each output sample is an input sample plus ``rejected``: responses that perturb one factor
(time or text) of one event of the ground truth, families ``temporal_shift``,
``temporal_stretch``, ``temporal_swap``, ``text_replace``, ``text_delete``, ``text_repeat``,
``text_insert`` (definitions in ``d2vlm_jax/data/preferences.py``). Deterministic given
--seed. Samples without events are left out. Prints a table of counts per family.

Usage:
  python launch/make_preferences.py --input /data/synthetic/train.json \
      --output /data/synthetic/prefs.json --seed 0 --per_sample 2 \
      --families temporal_shift,temporal_swap,text_replace,text_delete
"""

from __future__ import annotations

import time

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging

from d2vlm_jax import cli  # noqa: E402

from d2vlm_jax.data import preferences, schema

_INPUT = flags.DEFINE_string("input", None, "Annotation JSON file (schema of SPEC §2.3) with the "
                             "ground-truth (chosen) responses.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the preference annotations (same "
                              "schema plus 'rejected').", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Synthesis seed: the same seed and input give the same file.")
_PER_SAMPLE = flags.DEFINE_integer("per_sample", 2, "Rejected responses per sample (different "
                                   "families first).", lower_bound=1)
_FAMILIES = flags.DEFINE_list("families", list(preferences.ALL_FAMILIES),
                              "Comma-separated perturbation families to draw from; one of "
                              f"{', '.join(preferences.ALL_FAMILIES)}.")
_MIN_CHANGE = flags.DEFINE_float("min_change_s", 1.0, "Smallest change of a perturbed interval "
                                 "endpoint, seconds.")
_FRAME_RATE = flags.DEFINE_float("frame_rate", 1.0, "Training frame rate (fps): a temporal "
                                 "perturbation must change the frame interval at this rate.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Training max_frames (longer videos are "
                                   "subsampled); default: no limit.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Invalid input samples: "
                              "stop with an error naming the sample, or skip them (logged, counted).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [f for f in _FAMILIES.value if f not in preferences.ALL_FAMILIES]
    if unknown:
        raise cli.UsageError(f"unknown --families {unknown}; known: {', '.join(preferences.ALL_FAMILIES)}")
    begin = time.perf_counter()
    report = schema.ValidationReport()
    samples = schema.load_annotations(_INPUT.value, on_error=_ON_ERROR.value, report=report)
    if report.num_skipped:
        logging.warning("%d invalid input sample(s) skipped", report.num_skipped)
    out, counts = preferences.make_preference_samples(
        samples, seed=_SEED.value, families=_FAMILIES.value, per_sample=_PER_SAMPLE.value,
        min_change_s=_MIN_CHANGE.value, frame_rate=_FRAME_RATE.value, max_frames=_MAX_FRAMES.value)
    schema.save_annotations(out, _OUTPUT.value)
    print(counts.summary(_FAMILIES.value))
    print(f"wrote {len(out)} preference samples "
          f"({sum(len(s.rejected) for s in out)} rejected responses) to {_OUTPUT.value} "
          f"in {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    cli.run(main)
