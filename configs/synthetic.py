"""The embedded default: a tiny D²VLM trained from scratch on synthetic event videos, on CPU.

    python launch/train.py --config configs/synthetic.py --workdir workdir/synthetic

Generates the dataset if absent (``synthetic.out_dir``), runs SFT then FPO, evaluates the
held-out split and prints the final table (model vs a video-blind baseline).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.stages = ("sft", "fpo")
    c.synthetic = ml_collections.ConfigDict(dict(
        generate=True, out_dir="data/synthetic", num_train=300, num_val=40, seed=0, preferences_per_sample=2))

    hidden = 128
    c.model = ml_collections.ConfigDict(dict(
        # layers unrolled: a 4-layer model compiles in seconds either way (the full-size configs scan)
        k_evi=2, alpha=2.0, injection="single_pass", lm_logits_chunk=0, scan_layers=False,
        llm=dict(family="llama", vocab_size=0, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=4,
                 num_heads=4, num_kv_heads=4, rope_theta=10000.0, lora_rank=0, dtype="float32",
                 remat_policy="none", attention_impl="xla"),
        video=dict(
            vision=dict(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128, output_layer=2),
            qformer=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=0,
                         max_position_embeddings=64, num_queries=4, encoder_width=64),
            compressor=dict(query_dim=64, vision_dim=64, out_dim=hidden)),
    ))
    # from scratch: everything trains except the (random, frozen) vision tower
    c.trainable = [["video/vision/.*", False], [".*", True]]

    d = c.data
    d.train_annotations = "data/synthetic/train.json"
    d.eval_annotations = "data/synthetic/val.json"
    d.llm_tokenizer = "data/synthetic/tokenizer.json"
    d.qformer_vocab = "data/synthetic/vocab.txt"
    d.qformer_max_length = 32
    d.image_size = 56
    d.max_frames = 16
    d.min_duration = 2.0
    d.max_duration = 60.0
    d.template.max_length = 256
    d.buckets = ml_collections.ConfigDict(dict(N=[16], L=[16, 32], P=[64, 96], R=[32, 48, 64], M=[8], K=[4], Q=[2],
                                               C=[2]))
    d.shape_policy = "max"
    d.read_threads = 2

    c.sft = ml_collections.ConfigDict(dict(steps=1500, batch_size=8, micro_batches=1,
                                           optim=common.optim(lr=1e-3, lora_lr=1e-3, warmup_ratio=0.03)))
    c.fpo = ml_collections.ConfigDict(dict(steps=100, batch_size=8, micro_batches=1,
                                           optim=common.optim(lr=2e-4, lora_lr=2e-4, warmup_ratio=0.03),
                                           data=dict(train_annotations="data/synthetic/train_preferences.json")))
    c.checkpoint.every_steps = 250
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches_during_train = 2
    c.eval_batch_size = 16
    c.eval_max_new_tokens = 48
    if arg == "smoke":  # a seconds-long end-to-end run for tests
        c.synthetic.num_train, c.synthetic.num_val = 6, 3
        c.sft.steps, c.fpo.steps = 4, 2
        c.sft.batch_size = c.fpo.batch_size = 4
        c.checkpoint.every_steps = 2
        c.log_every = 1
        c.eval_every = 0
        c.eval_batch_size = 4
        c.eval_max_new_tokens = 12
    return c
