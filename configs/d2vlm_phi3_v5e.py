"""Full-size D²VLM on a Cloud TPU v5e-16 slice (16 chips, 16 GiB HBM each; topology v5e:4x4,
4 hosts).

    python launch/compile_check.py --config configs/d2vlm_phi3_v5e.py --topology v5e:4x4
    python launch/compile_check.py --config configs/d2vlm_phi3_v5e.py:fpo --topology v5e:4x4 --stage fpo

* mesh: fsdp 2 x tensor 8. One full-size sample (350 frames, 2048 tokens) needs ~70 GiB of
  temporaries on one chip (v5p figures in docs/BENCHMARKS.md), far above 16 GiB, so each sample
  is split over the 8 chips of a tensor group (attention heads / MLP columns of the ViT and the
  LLM; the Q-Former's 12 heads do not divide by 8 and stay replicated), and parameters +
  optimizer state are split 16 ways where their shapes allow;
* SFT: 16 samples per step as 8 micro-batches of 2 (one sample per tensor group); FPO: 64
  pairs per step as 32 micro-batches of 2;
* buckets as ``d2vlm_phi3_v5p.pod_buckets`` (P 1536 + R 512 = 2048 tokens, 350 frames).

STATUS: this plan does NOT fit yet (compile check: XLA RESOURCE_EXHAUSTED, 17.86 GiB of
temporaries vs 15.75 GiB usable; tensor 16 instead of 8: 17.29 GiB; bf16 parameters: 16.65
GiB). The buffer assignment shows why: the frozen ViT's f32 attention scores for all 350
frames of a sample (``f32[350, ., 257, 257]`` per block, several alive at once) are not split
when data x fsdp is small. Running the vision tower over chunks of frames (it has no
gradient, so this costs nothing) or sharding frames over the tensor axis too should bring it
under 16 GiB; re-run the compile check after such a change.
"""

import ml_collections

from configs import d2vlm_phi3_v5p


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = d2vlm_phi3_v5p.get_config(arg)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=8))
    c.sft.batch_size, c.sft.micro_batches = 16, 8
    if arg == "fpo":
        c.fpo.batch_size, c.fpo.micro_batches = 64, 32
    return c
