"""Shared defaults of experiment configs (imported by the files in configs/)."""

import ml_collections

from d2vlm_jax.data import pipeline
from d2vlm_jax.partition import D2VLM_TRAINABLE


def optim(lr: float, lora_lr: float, warmup_ratio: float = 0.03) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(lr=lr, lora_lr=lora_lr, warmup_ratio=warmup_ratio, weight_decay=0.0,
                                          b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, schedule="cosine"))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("sft",)
    c.init_checkpoint = ""          # params to start the first stage from ("" = random init)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = ml_collections.config_dict.placeholder(tuple)  # None = sharding.DEFAULT_RULES
    c.trainable = [list(p) for p in D2VLM_TRAINABLE]
    # fpo_grounding_targets "seconds" / normalization "sample": the authors' semantics,
    # "frames" / "token" the project's originals (docs/ARCHITECTURE.md "Training semantics")
    c.loss = ml_collections.ConfigDict(dict(alpha=2.0, gnd_weight=10.0, cons_weight=10.0, fpo_beta=0.1,
                                            fpo_weight=1.0, fpo_reference="none", normalization="sample",
                                            fpo_grounding_targets="seconds"))
    c.data = pipeline.default_data_config()
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=3, async_save=True))
    c.log_every = 10
    c.eval_every = 0                 # 0 = only the final evaluation
    c.eval_batches_during_train = 4
    c.eval_batch_size = 8
    c.eval_max_new_tokens = 64
    c.final_eval = True
    c.log_example_ids = False        # write <stage>/examples.process_<i>.jsonl (which samples each step used)
    return c
