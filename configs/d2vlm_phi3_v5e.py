"""Full-size D²VLM on a Cloud TPU v5e-16 slice (16 chips, 16 GiB HBM each; topology v5e:4x4,
4 hosts).

    python launch/compile_check.py --config configs/d2vlm_phi3_v5e.py --topology v5e:4x4
    python launch/compile_check.py --config configs/d2vlm_phi3_v5e.py:fpo --topology v5e:4x4 --stage fpo

* mesh: fsdp 2 x tensor 8. One full-size sample (350 frames, 2048 tokens) needs ~70 GiB of
  temporaries on one chip (v5p figures in docs/BENCHMARKS.md), far above 16 GiB, so each
  sample's LLM work is split over the 8 chips of a tensor group (attention heads, MLP columns,
  vocabulary), and parameters + optimizer state are split 16 ways where their shapes allow;
* the video encoder's frames are split over all 16 chips (``sharding_rules``: ``frames`` ->
  data x fsdp x tensor) rather than over the 2 fsdp groups only: the EVA-ViT and the Q-Former
  are small per frame, but their activations for 350 frames are not (the trainable Q-Former
  keeps ~40 [frames, 288, 768] residuals per layer for the backward pass). The largest frames
  bucket is 352 so that a micro-batch's 704 frames split evenly (44 per chip), and the frozen
  tower runs over them in 4 sequential chunks of 11 (``vision.frame_chunks``);
* SFT: 16 samples per step as 8 micro-batches of 2 (one sample per fsdp group); FPO: 64
  pairs per step as 32 micro-batches of 2;
* buckets otherwise as ``d2vlm_phi3_v5p.pod_buckets`` (P 1536 + R 512 = 2048 tokens).

History (docs/BENCHMARKS.md): with frames over fsdp only, the plan needed 17.86 GiB of
temporaries (RESOURCE_EXHAUSTED, 15.75 GiB usable), 18.43 GiB with the tower chunked: the
Q-Former's residuals for 350 frames per chip dominated, not the tower.
"""

import ml_collections

from configs import d2vlm_phi3_v5p
from d2vlm_jax import sharding


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = d2vlm_phi3_v5p.get_config(arg)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=8))
    c.sharding_rules = sharding.rules_with({"frames": ("data", "fsdp", "tensor")})
    c.data.buckets.N = [64, 128, 256, 352]   # 2 x 352 frames = 44 per chip
    c.model.video.vision.frame_chunks = 4    # 11 frames per chip per chunk
    c.sft.batch_size, c.sft.micro_batches = 16, 8
    if arg == "fpo":
        c.fpo.batch_size, c.fpo.micro_batches = 64, 32
    return c
