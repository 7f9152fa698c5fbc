"""Full-size D²VLM on a Cloud TPU v5p-8 slice (4 chips, 95 GiB HBM each; topology v5p:2x2x1).

The SFT config (``d2vlm_phi3_sft.py``: EVA-ViT-g + Q-Former + Phi-3-Mini, up to 350 frames,
2048 tokens) with a plan checked by the deviceless compile (docs/TPU.md, docs/BENCHMARKS.md):

    python launch/compile_check.py --config configs/d2vlm_phi3_v5p.py --topology v5p:2x2x1
    python launch/compile_check.py --config configs/d2vlm_phi3_v5p.py:fpo --topology v5p:2x2x1 --stage fpo

* mesh: all 4 chips on ``fsdp`` (parameters, optimizer state and the batch split 4 ways);
* SFT: 8 samples per step (the authors' 8 devices x 1) as 2 micro-batches of 4, one sample
  per chip at a time (8 samples in one micro-batch, 2 per chip, need 96.1 GiB per chip: 1.1
  GiB over HBM); FPO: 64 pairs per step as 16 micro-batches of 4;
* buckets: every multi-host batch is padded to the largest buckets (``shape_policy="max"``),
  so the largest prefix + response equals the 2048-token limit (P 1536 + R 512) instead of the
  generic 2048 + 1024; a longer example is skipped and counted (``bucket_overflow``).

``:fpo`` selects the FPO stage (init from the SFT export, preference annotations).
"""

import ml_collections

from configs import d2vlm_phi3_fpo, d2vlm_phi3_sft


def pod_buckets() -> ml_collections.ConfigDict:
    """Padded sizes for a 2048-token limit with up to 350 frames (1 fps, 5-350 s videos)."""
    return ml_collections.ConfigDict(dict(
        N=[64, 128, 256, 350], L=[64, 128, 256], P=[512, 1024, 1536], R=[128, 256, 512],
        M=[8, 16, 32, 64], K=[4, 8, 16, 32], Q=[1, 4, 8], C=[1, 2]))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "sft", "fpo"):
        raise ValueError(f"configs/d2vlm_phi3_v5p.py: variant must be 'sft' or 'fpo', got {arg!r}")
    c = d2vlm_phi3_fpo.get_config() if arg == "fpo" else d2vlm_phi3_sft.get_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.data.buckets = pod_buckets()
    c.data.shape_policy = "max"
    c.model.llm.remat_policy = "full"
    c.sft.batch_size, c.sft.micro_batches = 8, 2
    if arg == "fpo":
        c.fpo.batch_size, c.fpo.micro_batches = 64, 16
    return c
