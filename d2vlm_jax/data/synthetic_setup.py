"""Makes sure the embedded default dataset exists: synthetic clips, tokenizers, and the FPO
preference file. Generated once by process 0; other processes wait for it."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections

from d2vlm_jax.data import preferences, schema, synthetic

logger = logging.getLogger(__name__)

PREFERENCES_FILE = "train_preferences.json"


def ensure_synthetic_data(config: ml_collections.ConfigDict) -> str:
    """Generates ``config.synthetic.out_dir`` if its ``manifest.json`` is missing; returns the dir."""
    s = config.synthetic
    out_dir = os.path.abspath(s.out_dir)
    manifest = os.path.join(out_dir, "manifest.json")
    prefs = os.path.join(out_dir, PREFERENCES_FILE)
    if jax.process_index() == 0 and not (os.path.exists(manifest) and os.path.exists(prefs)):
        t0 = time.time()
        print(f"[data] generating the synthetic dataset in {out_dir} ({s.num_train} train + {s.num_val} val clips)",
              flush=True)
        synthetic.generate_synthetic(out_dir, num_train=s.num_train, num_val=s.num_val, seed=s.seed)
        train = schema.load_annotations(os.path.join(out_dir, "train.json"))
        with_rejected, counts = preferences.make_preference_samples(
            train, seed=s.seed, per_sample=s.preferences_per_sample, frame_rate=config.data.fps,
            max_frames=config.data.max_frames)
        schema.save_annotations(with_rejected, prefs)
        logger.info("preference pairs per family:\n%s", counts.summary())
        print(f"[data] done in {time.time() - t0:.1f}s: {sum(counts.made.values())} preference pairs for "
              f"{counts.samples_out} of {counts.samples_in} training samples (per family: the log file)", flush=True)
    deadline = time.time() + 600
    while not (os.path.exists(manifest) and os.path.exists(prefs)):
        if time.time() > deadline:
            raise TimeoutError(f"synthetic data did not appear in {out_dir} (process 0 generates it)")
        time.sleep(1.0)
    with open(manifest) as f:
        json.load(f)
    return out_dir
