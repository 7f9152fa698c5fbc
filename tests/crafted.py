"""A tiny checkpoint in seconds, without training: random params crafted so that greedy
decoding follows a chosen chain of tokens (shared by the infer/evaluate and demo tests)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np


def crafted_params(model_cfg, tokenizer, last_prompt_token: int, answer_ids: Sequence[int] = ()) -> dict:
    """Random params (numpy, instant: no init compile) in which greedy decoding answers every
    prompt with ``<evi></evi>`` + ``answer_ids`` + ``<|end|>``: the LLM's token embeddings
    dominate its residual stream, and the lm_head column of each next token is the
    (normalized) embedding of the token before it (so every token of the chain must be
    distinct). The grounding heads are random, so each <evi> gets its interval from a real
    (random) grounding curve through the real decode path."""
    from flax import traverse_util
    from d2vlm_jax import sharding
    from d2vlm_jax.train.loop import abstract_boxed_variables

    rng = np.random.default_rng(0)
    abstract = traverse_util.flatten_dict(sharding.unbox(abstract_boxed_variables(model_cfg))["params"], sep="/")
    params = {}
    for name, leaf in abstract.items():
        if name.endswith("scale"):
            value = np.ones(leaf.shape)
        elif name.endswith("bias"):
            value = np.zeros(leaf.shape)
        else:
            std = 1.0 if name == "llm/embed_tokens/embedding" else (0.5 if "_head/" in name else 0.02)
            value = rng.normal(0.0, std, leaf.shape)
        params[name] = value.astype(leaf.dtype)
    embedding, lm_head = params["llm/embed_tokens/embedding"], params["llm/lm_head/kernel"]
    chain = [last_prompt_token, tokenizer.evi_id, tokenizer.evi_end_id, *answer_ids, tokenizer.end_id]
    assert len(set(chain)) == len(chain), "the chain's tokens must be distinct"
    for before, after in zip(chain[:-1], chain[1:]):
        lm_head[:, after] = 20.0 * embedding[before] / np.linalg.norm(embedding[before])
    return traverse_util.unflatten_dict(params, sep="/")


def crafted_workdir(data_dir, workdir, make_config: Callable, answer_text: str = "") -> dict:
    """Smoke data in ``data_dir`` + a training workdir with crafted params saved as the SFT
    export (the layout train/loop.py writes: config.json, sft/export/params,
    sft/export/d2vlm_config.json). ``answer_text``: what the answer says after ``</evi>``."""
    from d2vlm_jax import config as cfg_lib
    from d2vlm_jax.data import pipeline, synthetic_setup
    from d2vlm_jax.data.template import build_prompt_example
    from d2vlm_jax.train import checkpoint as ckpt_lib
    from d2vlm_jax.weights.d2vlm_checkpoint import save_model_config

    cfg = make_config(data_dir)
    synthetic_setup.ensure_synthetic_data(cfg)
    tokenizer, qformer_tokenizer = pipeline.load_tokenizers(cfg.data)
    model_cfg = cfg_lib.model_config(cfg, vocab_size=tokenizer.vocab_size, qformer_vocab_size=qformer_tokenizer.vocab_size)
    prompt = build_prompt_example({"question": "q"}, frame_times=np.zeros(2, np.float32), tokenizer=tokenizer,
                                  qformer_tokenizer=qformer_tokenizer,
                                  config=pipeline.template_config(cfg.data, tokenizer, train=False))
    answer_ids = tokenizer.encode(answer_text) if answer_text else []
    params = crafted_params(model_cfg, tokenizer, int(prompt["prefix_ids"][-1]), answer_ids)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    export = os.path.join(workdir, "sft", "export")
    ckpt_lib.save_params(os.path.join(export, "params"), params)
    save_model_config(export, model_cfg)
    return {"workdir": str(workdir), "data_dir": str(data_dir), "config": cfg, "model_cfg": model_cfg}
