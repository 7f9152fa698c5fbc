"""One attention call at full size, compiled deviceless for one TPU chip: XLA vs splash
attention (dynamic mask) vs the alternatives for the response branches. Per-chip temporaries
and FLOPs of forward + backward (forward only for the vision tower, which is never
differentiated), one example (B = 1), bf16.

    python benchmarks/attention_kernels.py [--topology v5p:2x2x1] [--cases prefix,sft,fpo,vision]

Cases (Phi-3: 32 heads x 96; EVA-ViT-g: 16 heads x 88):

* ``prefix``: the prefix pass, T = S = 1536, frames a bidirectional block of 350 at offset 100;
* ``sft`` / ``fpo``: the response pass against the prefix cache, 1 / 3 branches of 512
  (T = 512 / 1536, S = 2048 / 3072);
* ``vision``: 8 frames of 257 tokens, no mask, forward only (the tower has no gradient);
* ``qformer``: Q-Former self-attention (12 heads x 64) over [32 queries; 256 text] = 288
  tokens of 350 frames (one row's frames on one chip), text padding masked, fwd + bwd.

Variants:

* ``xla``: the einsum path (f32 scores, materialized mask), as the model runs today;
* ``splash``: ``d2vlm_jax.models.kernels.splash`` (the mask description -> dynamic mask);
* ``per_branch`` (responses): one static-mask splash call per branch over
  ``[prefix; own branch]`` keys (``vmap`` over branches, padding by segment ids);
* ``cascade_fwd`` (responses, forward only): prefix part + own-branch part merged by their
  log-sum-exp (``save_residuals=True``, which has no backward: the forward bounds its cost).

The kernel's own FLOPs are invisible to XLA's cost analysis (a Mosaic custom call without a
cost estimate); ``kernel GFLOP`` counts them from the block map of the case's layout:
``4 bq bkv D`` per head and computed block forward, ``14 bq bkv D`` backward (the dq kernel
recomputes QK^T, the dkv kernel again).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2vlm_jax import compile_check  # noqa: E402

compile_check.set_libtpu_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: E402
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: E402

from d2vlm_jax.models import attention as attn_lib  # noqa: E402
from d2vlm_jax.models.kernels import splash  # noqa: E402

HEADS, DIM, PREFIX, RESPONSE, FRAMES, FRAME_START = 32, 96, 1536, 512, 350, 100


def case_layout(case: str):
    """(T, S, numpy layout [1, S] x 3, query_start) of a representative example."""
    branches = {"prefix": 0, "sft": 1, "fpo": 3}[case]
    s = PREFIX + branches * RESPONSE
    valid = np.ones((1, s), bool)
    branch = np.zeros((1, s), np.int32)
    block = np.zeros((1, s), np.int32)
    block[0, FRAME_START:FRAME_START + FRAMES] = 1
    valid[0, PREFIX - 36:PREFIX] = False                         # some prefix padding
    for c in range(branches):
        lo = PREFIX + c * RESPONSE
        branch[0, lo:lo + RESPONSE] = c + 1
        valid[0, lo + RESPONSE - 40 * (c + 1):lo + RESPONSE] = False
    t = PREFIX if case == "prefix" else branches * RESPONSE
    return t, s, (valid, branch, block), (0 if case == "prefix" else PREFIX)


def kernel_gflops(mask: np.ndarray, heads: int, dim: int, backward: bool) -> float:
    """FLOPs the splash kernel computes for bool[T, S] (blocks with any allowed entry)."""
    t, s = mask.shape
    bq, bkv = splash.block_size(t), splash.block_size(s)
    blocks = mask.reshape(t // bq, bq, s // bkv, bkv).any(axis=(1, 3)).sum()
    per_block = (4 + (14 if backward else 0)) * bq * bkv * dim
    return float(blocks * per_block * heads) / 1e9


def per_branch_attention(q, k, v, valid, branches: int, interpret=False):
    """Static-mask splash per branch: q [1, C*R, H, D] against [prefix; branch c] keys."""
    r = RESPONSE
    static = np.concatenate([np.ones((r, PREFIX), bool), np.tril(np.ones((r, r), bool))], axis=1)
    blocks = sk.BlockSizes(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512, block_kv_dkv=512,
                           block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.NumpyMask(static)]), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    qb = q[0].reshape(branches, r, HEADS, DIM).transpose(0, 2, 1, 3) * DIM ** -0.5
    kp, vp = k[0, :PREFIX], v[0, :PREFIX]
    kb = k[0, PREFIX:].reshape(branches, r, HEADS, DIM)
    vb = v[0, PREFIX:].reshape(branches, r, HEADS, DIM)
    keys = jnp.concatenate([jnp.broadcast_to(kp, (branches,) + kp.shape), kb], 1).transpose(0, 2, 1, 3)
    vals = jnp.concatenate([jnp.broadcast_to(vp, (branches,) + vp.shape), vb], 1).transpose(0, 2, 1, 3)
    kv_valid = jnp.concatenate([jnp.broadcast_to(valid[0, :PREFIX], (branches, PREFIX)),
                                valid[0, PREFIX:].reshape(branches, r)], 1)
    q_valid = valid[0, PREFIX:].reshape(branches, r)
    seg_kv = jnp.where(kv_valid, 1, 2).astype(jnp.int32)
    seg_q = jnp.where(q_valid, 1, 2).astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(sq, skv)))(
        qb, keys, vals, seg_q, seg_kv)
    return out.transpose(0, 2, 1, 3).reshape(1, branches * r, HEADS, DIM)


def cascade_forward(q, k, v, valid, branch, branches: int):
    """Prefix part + own-branch part, merged by log-sum-exp (forward only)."""
    t = branches * RESPONSE
    blocks = sk.BlockSizes(block_q=512, block_kv=512, block_kv_compute=512)
    full = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((t, PREFIX))]), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, save_residuals=True)
    causal = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))]), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, save_residuals=True)
    qh = q[0].transpose(1, 0, 2) * DIM ** -0.5
    kp, vp = k[0, :PREFIX].transpose(1, 0, 2), v[0, :PREFIX].transpose(1, 0, 2)
    kr, vr = k[0, PREFIX:].transpose(1, 0, 2), v[0, PREFIX:].transpose(1, 0, 2)
    q_valid = valid[0, PREFIX:]
    out_p, (lse_p,) = full(qh, kp, vp, segment_ids=sk.SegmentIds(jnp.ones((t,), jnp.int32),
                                                                  valid[0, :PREFIX].astype(jnp.int32)))
    seg_r = jnp.where(q_valid, branch[0, PREFIX:], -1 - jnp.arange(t)).astype(jnp.int32)
    out_r, (lse_r,) = causal(qh, kr, vr, segment_ids=sk.SegmentIds(seg_r, seg_r))
    lse = jnp.logaddexp(lse_p, lse_r)
    out = (out_p * jnp.exp(lse_p - lse)[..., None] + out_r * jnp.exp(lse_r - lse)[..., None]).astype(q.dtype)
    return out.transpose(1, 0, 2)[None]


def compile_one(fn, args, backward: bool, device):
    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) ** 2)
    f = jax.grad(loss, argnums=(0, 1, 2)) if backward else fn
    sh = jax.sharding.SingleDeviceSharding(device)
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) for x in args]
    t0 = time.time()
    compiled = jax.jit(f).lower(*abstract).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled.memory_analysis().temp_size_in_bytes, float(cost.get("flops", 0.0)), time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--cases", default="prefix,sft,fpo,vision,qformer")
    args = parser.parse_args()
    device = compile_check.topology_devices(args.topology)[0]
    print(f"one chip of {args.topology}; bf16; B = 1; temporaries and XLA FLOPs of the compiled call")
    print(f"{'case':>7} {'variant':>12} {'pass':>8} {'temp MiB':>9} {'XLA GFLOP':>10} {'kernel GFLOP':>12} {'compile s':>9}")
    bf = jnp.bfloat16
    for case in args.cases.split(","):
        if case == "vision":
            f, t, h, d = 8, 257, 16, 88
            qkv = [jnp.zeros((f, t, h, d), bf)] * 3
            variants = {"xla": lambda q, k, v: attn_lib.xla_attention(q, k, v, jnp.ones((1, t, t), bool)),
                        "splash": lambda q, k, v: splash.splash_attention(q, k, v, None, interpret=False)}
            for name, fn in variants.items():
                temp, flops, secs = compile_one(fn, qkv, False, device)
                kern = kernel_gflops(np.ones((384, 384), bool), h, d, False) * f if name == "splash" else 0.0
                print(f"{case:>7} {name:>12} {'fwd':>8} {temp / 2**20:9.1f} {flops / 1e9:10.1f} {kern:12.1f} {secs:9.1f}",
                      flush=True)
            continue
        if case == "qformer":
            f, t, h, d = 350, 288, 12, 64
            key_valid = np.arange(t) < 32 + 100                             # 100 text tokens, rest padding
            mask = jnp.asarray(np.broadcast_to(key_valid, (1, t, t)))
            qkv = [jnp.zeros((f, t, h, d), bf)] * 3
            variants = {"xla": lambda q, k, v: attn_lib.xla_attention(q, k, v, mask),
                        "splash": lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=False)}
            padded = np.zeros((384, 384), bool)
            padded[:t, :t] = np.asarray(mask[0])
            padded[t:, 0] = True
            for name, fn in variants.items():
                for backward in (False, True):
                    temp, flops, secs = compile_one(fn, qkv, backward, device)
                    kern = kernel_gflops(padded, h, d, backward) * f if name == "splash" else 0.0
                    print(f"{case:>7} {name:>12} {'fwd+bwd' if backward else 'fwd':>8} {temp / 2**20:9.1f} "
                          f"{flops / 1e9:10.1f} {kern:12.1f} {secs:9.1f}", flush=True)
            continue
        t, s, (valid, branch, block), start = case_layout(case)
        layout_np = attn_lib.SequenceLayout(jnp.asarray(valid), jnp.asarray(branch), jnp.asarray(block))
        mask_np = np.asarray(attn_lib.build_mask(layout_np, start, t))[0]
        q, k = jnp.zeros((1, t, HEADS, DIM), bf), jnp.zeros((1, s, HEADS, DIM), bf)
        args_ = [q, k, k, jnp.asarray(valid), jnp.asarray(branch), jnp.asarray(block)]

        def desc(valid, branch, block):
            return attn_lib.AttentionMask(attn_lib.SequenceLayout(valid, branch, block), start)
        variants = {
            "xla": lambda q, k, v, a, b, c: attn_lib.xla_attention(q, k, v, desc(a, b, c).dense(t)),
            "splash": lambda q, k, v, a, b, c: splash.splash_attention(q, k, v, desc(a, b, c), interpret=False),
        }
        if case != "prefix":
            nb = {"sft": 1, "fpo": 3}[case]
            variants["per_branch"] = lambda q, k, v, a, b, c, nb=nb: per_branch_attention(q, k, v, a, nb)
            variants["cascade_fwd"] = lambda q, k, v, a, b, c, nb=nb: cascade_forward(q, k, v, a, b, nb)
        for name, fn in variants.items():
            for backward in ((False,) if name == "cascade_fwd" else (False, True)):
                temp, flops, secs = compile_one(fn, args_, backward, device)
                kern = kernel_gflops(mask_np, HEADS, DIM, backward) if name == "splash" else 0.0
                print(f"{case:>7} {name:>12} {'fwd+bwd' if backward else 'fwd':>8} {temp / 2**20:9.1f} "
                      f"{flops / 1e9:10.1f} {kern:12.1f} {secs:9.1f}", flush=True)


if __name__ == "__main__":
    main()
