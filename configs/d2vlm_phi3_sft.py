"""Full-size D²VLM SFT (SPEC §1 shapes, §7 hyperparameters): EVA-ViT-g + Q-Former + Phi-3-Mini.

    python launch/train.py --config configs/d2vlm_phi3_sft.py --workdir DIR \
        --config.init_checkpoint=ETCHAT_IMPORTED/params \
        --config.data.train_annotations=... --config.data.eval_annotations=... \
        --config.data.llm_tokenizer=.../tokenizer.json --config.data.qformer_vocab=.../vocab.txt

Initialization: the E.T. Chat stage-2 checkpoint converted with launch/import_checkpoint.py
(its unrolled ``layers_{i}`` are stacked on load: ``model.scan_layers`` runs the decoder, the
vision tower and the Q-Former as ``nn.scan`` loops, so a compile does not grow with depth).
Batch: 1 sample per device (``sft.batch_size`` = number of devices), one epoch.
"""

import ml_collections

from configs import common


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        k_evi=6, alpha=2.0, injection="single_pass", scan_layers=True,
        lm_logits_chunk=256,   # LM log-probabilities 256 response tokens at a time (no [B, C1, R, V] logits)
        llm=dict(family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                 num_heads=32, num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, lora_rank=128,
                 lora_alpha=256.0, lora_dropout=0.05, dtype="bfloat16", param_dtype="float32",
                 remat_policy="full",
                 attention_impl="auto"),  # splash on TPU, cuDNN on GPU, XLA on CPU (docs/ARCHITECTURE.md)
        video=dict(
            vision=dict(image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144,
                        output_layer=39, dtype="bfloat16"),
            qformer=dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30523,
                         max_position_embeddings=512, num_queries=32, encoder_width=1408, dtype="bfloat16",
                         # scanned, the Q-Former's residuals are whatever its body saves: keep the
                         # projections, recompute attention inside each layer (docs/BENCHMARKS.md)
                         remat_policy="dots_with_no_batch_dims_saveable"),
            compressor=dict(query_dim=768, vision_dim=1408, out_dim=3072, dtype="bfloat16")),
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.stages = ("sft",)
    c.model = model_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    d = c.data
    d.fps, d.max_frames, d.min_duration, d.max_duration, d.image_size = 1.0, 350, 5.0, 350.0, 224
    d.template.max_length = 2048
    d.prefix_space = "never"
    d.workers = 8
    c.sft = ml_collections.ConfigDict(dict(steps=0, epochs=1, batch_size=8, micro_batches=1,
                                           optim=common.optim(lr=2e-5, lora_lr=5e-5, warmup_ratio=0.03)))
    c.checkpoint.every_steps = 500
    c.log_every = 10
    c.eval_every = 0
    c.eval_max_new_tokens = 256
    return c
