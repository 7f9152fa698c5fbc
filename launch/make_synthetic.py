r"""Writes the synthetic shapes dataset (the embedded default dataset of d2vlm_jax).

Clips of coloured shapes that appear, move and vanish at random known times, encoded as
H.264 mp4, with annotations for temporal grounding (tvg), dense captioning (dvc) and
questions about a user-given time (rvc), the tiny tokenizers for this vocabulary and a
manifest. See ``d2vlm_jax/data/synthetic.py`` for the design.

Usage:
  python launch/make_synthetic.py --out_dir /tmp/synthetic --num_train 256 --num_val 32

Output in --out_dir:
  videos/{train,val}_NNNNN.mp4   the clips
  train.json, val.json           annotations (schema of SPEC §2.3), 3 samples per clip
  clips.json                     every clip's generating spec (objects, times, positions)
  tokenizer.json, vocab.txt      tiny LLM tokenizer and Q-Former WordPiece vocabulary
  manifest.json                  seed, counts, settings, generator version, blind baseline
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

from d2vlm_jax import cli  # noqa: E402

from d2vlm_jax.data import synthetic

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory to write the dataset into "
                               "(created if needed; files of the same names are replaced).",
                               required=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 256, "Number of training clips "
                                  "(3 samples each: tvg, dvc, rvc).", lower_bound=0)
_NUM_VAL = flags.DEFINE_integer("num_val", 32, "Number of validation clips.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed: the same seed gives the same "
                             "annotations and the same frames.")
_FRAME_SIZE = flags.DEFINE_integer("frame_size", synthetic.SyntheticSettings.frame_size,
                                   "Frame height = width in pixels.")
_VIDEO_FPS = flags.DEFINE_integer("video_fps", synthetic.SyntheticSettings.video_fps,
                                  "Frame rate of the written videos.")
_MIN_DURATION = flags.DEFINE_integer("min_duration", synthetic.SyntheticSettings.min_duration,
                                     "Shortest clip, seconds.")
_MAX_DURATION = flags.DEFINE_integer("max_duration", synthetic.SyntheticSettings.max_duration,
                                     "Longest clip, seconds.")
_CRF = flags.DEFINE_integer("crf", synthetic.SyntheticSettings.crf,
                            "libx264 constant rate factor (lower: closer to the rendering).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = synthetic.SyntheticSettings(
        frame_size=_FRAME_SIZE.value, video_fps=_VIDEO_FPS.value,
        min_duration=_MIN_DURATION.value, max_duration=_MAX_DURATION.value, crf=_CRF.value)
    step = max(1, (_NUM_TRAIN.value + _NUM_VAL.value) // 20)

    def progress(split: str, done: int, total: int) -> None:
        if done == total or done % step == 0:
            print(f"  {split}: {done}/{total} clips", file=sys.stderr, flush=True)

    begin = time.perf_counter()
    manifest = synthetic.generate_synthetic(
        _OUT_DIR.value, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
        seed=_SEED.value, settings=settings, progress=progress)
    elapsed = time.perf_counter() - begin
    total_clips = _NUM_TRAIN.value + _NUM_VAL.value
    print(f"wrote {total_clips} clips, {sum(manifest['num_samples'].values())} samples to "
          f"{_OUT_DIR.value} in {elapsed:.1f} s")
    print("video-blind baselines on the val tvg events: "
          + json.dumps(manifest["blind_baseline"]))


if __name__ == "__main__":
    cli.run(main)
