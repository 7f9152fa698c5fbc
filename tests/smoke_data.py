"""The smoke dataset shared by the end-to-end tests (launcher, multi-host, infer/evaluate)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_dir: str):
    """``configs/synthetic.py:smoke`` with every data path pointing into ``data_dir``."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import synthetic as synthetic_config
    cfg = synthetic_config.get_config("smoke")
    cfg.synthetic.out_dir = str(data_dir)
    for field, name in (("train_annotations", "train.json"), ("eval_annotations", "val.json"),
                        ("llm_tokenizer", "tokenizer.json"), ("qformer_vocab", "vocab.txt")):
        cfg.data[field] = os.path.join(str(data_dir), name)
    cfg.fpo.data.train_annotations = os.path.join(str(data_dir), "train_preferences.json")
    return cfg


def make_smoke_data(data_dir: str) -> str:
    """Generates the smoke dataset through the launcher's own setup path; returns the dir."""
    from d2vlm_jax.data import synthetic_setup
    synthetic_setup.ensure_synthetic_data(smoke_config(data_dir))
    return str(data_dir)


def data_flags(data_dir: str) -> list[str]:
    """``launch/train.py`` flags that point the smoke config at ``data_dir``."""
    cfg = smoke_config(data_dir)
    return [f"--config.synthetic.out_dir={data_dir}",
            f"--config.data.train_annotations={cfg.data.train_annotations}",
            f"--config.data.eval_annotations={cfg.data.eval_annotations}",
            f"--config.data.llm_tokenizer={cfg.data.llm_tokenizer}",
            f"--config.data.qformer_vocab={cfg.data.qformer_vocab}",
            f"--config.fpo.data.train_annotations={cfg.fpo.data.train_annotations}"]
