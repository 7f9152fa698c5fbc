"""The D²VLM train step on one CUDA device: step time, tokens/s and MFU, XLA vs cuDNN attention.

    python benchmarks/gpu_step.py --json gpu_step.json                 # full size, on a GPU
    python benchmarks/gpu_step.py --tiny                               # tiny config (CPU or GPU)

Full size is the SFT / FPO train step of ``configs/d2vlm_phi3_sft.py`` / ``_fpo.py``
(EVA-ViT-g + Q-Former + Phi-3-Mini, bf16 compute, f32 master weights, LoRA, remat ``full``)
at the pod buckets of ``configs/d2vlm_phi3_v5p.py`` (350 frames, prefix 1536, response 512,
2 rejected branches for FPO), ``--batch`` rows per step on the one device, built by the
training loop's own ``train.loop.build_train_step``. For each stage and attention
implementation (``--impls``, default ``xla,cudnn``) it compiles the step, runs ``--warmup``
steps, then times ``--repeats`` steps (median) and reports:

* step time, LLM tokens per second (batch x (prefix + branches x response) padded slots)
  and frames per second;
* MFU = model FLOPs per step / step time / peak bf16 FLOP/s, against the datasheet peak of
  the device (:data:`PEAK_BF16_FLOPS`) and against a bf16 matmul peak measured in the same
  run; model FLOPs are XLA's count of the remat-free step with XLA attention (the same math
  as any kernel, attention counted dense);
* peak device memory (``memory_stats``) and compile time.

A variant that does not fit (``RESOURCE_EXHAUSTED``) or cannot run (cuDNN on CPU) is a row
with its reason; shrink ``--frames`` / ``--batch`` for a smaller GPU. ``--tiny`` (automatic
without a GPU) runs ``configs/synthetic.py`` so CI keeps this program working
(``tests/test_gpu_step.py``). The table is printed and, with ``--json``, written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from d2vlm_jax import config as cfg_lib  # noqa: E402
from d2vlm_jax import partition, sharding  # noqa: E402
from d2vlm_jax.testing import random_batch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; the first
# substring of the device kind that matches wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
)

FULL_BUCKETS = dict(N=350, L=256, P=1536, R=512, M=64, K=32, Q=8, C=2)   # configs/d2vlm_phi3_v5p.py maxima
TINY_BUCKETS = dict(N=16, L=32, P=96, R=64, M=8, K=4, Q=2, C=2)         # configs/synthetic.py maxima


@dataclasses.dataclass
class Row:
    """One measured (stage, attention implementation) variant."""
    stage: str
    impl: str
    status: str = "ok"            # ok | OOM | skipped | error
    reason: str = ""
    batch: int = 0
    tokens_per_step: int = 0
    frames_per_step: int = 0
    compile_s: float = 0.0
    step_s: float | None = None   # median
    step_s_all: list = dataclasses.field(default_factory=list)
    model_flops: float | None = None
    hardware_flops: float | None = None   # XLA's count of the compiled step (custom calls excluded)
    peak_memory_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.step_s if self.step_s else None

    def mfu(self, peak: float | None) -> float | None:
        if not (peak and self.step_s and self.model_flops):
            return None
        return self.model_flops / self.step_s / peak


def table_peak(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def measured_matmul_peak(n: int, repeats: int = 10) -> float:
    """bf16 ``[n, n] @ [n, n]`` FLOP/s (median of ``repeats``) on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def experiment_config(stage: str, tiny: bool, args) -> ml_collections.ConfigDict:
    """The stage's experiment config with this run's batch / remat / vocab settings."""
    if tiny:
        from configs import synthetic
        c = synthetic.get_config()
        c.model.llm.vocab_size, c.model.video.qformer.vocab_size = 512, 128
        c.model.llm.num_layers = 3                        # the fewest with k_evi = 2 < L - 1
        c.model.video.vision.depth = c.model.video.vision.output_layer = 1
    else:
        from configs import d2vlm_phi3_fpo, d2vlm_phi3_sft
        c = d2vlm_phi3_fpo.get_config() if stage == "fpo" else d2vlm_phi3_sft.get_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c[stage].batch_size, c[stage].micro_batches = args.batch, args.micro_batches
    if args.remat:
        c.model.llm.remat_policy = args.remat
    if args.lm_logits_chunk is not None:
        c.model.lm_logits_chunk = args.lm_logits_chunk
    return c


def batch_for(model_cfg, stage: str, buckets: dict, batch: int) -> dict:
    return random_batch(model_cfg, seed=0, batch=batch, frames=buckets["N"], qformer_len=buckets["L"],
                        prefix=buckets["P"], response=buckets["R"], evidence=buckets["M"], events=buckets["K"],
                        question_evidence=buckets["Q"], rejected=buckets["C"] if stage == "fpo" else 0,
                        lengths_fraction=1.0)


def model_flops(config: ml_collections.ConfigDict, stage: str, host_batch: dict) -> float | None:
    """XLA's FLOP count of the remat-free step with XLA attention, lowered (not compiled) for
    the host CPU, times the micro-batches (a scan body is counted once)."""
    from d2vlm_jax.train import loop
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.llm.remat_policy, c.model.llm.attention_impl = "none", "xla"
    c.model.video.vision.frame_chunks = 1
    model_cfg = cfg_lib.model_config(c)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])
    setup = loop.build_train_step(c, stage, model_cfg, mesh, total_steps=1000)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items() if k in setup.batch_keys}
    with jax.set_mesh(mesh):
        cost = setup.jit(False).lower(*setup.abstract_arguments(abstract, False)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    return flops * int(c[stage].micro_batches) or None


def run_variant(stage: str, impl: str, tiny: bool, buckets: dict, args, device) -> Row:
    from d2vlm_jax.train import loop
    from d2vlm_jax.train.step import init_state
    row = Row(stage=stage, impl=impl, batch=args.batch)
    if impl == "cudnn" and device.platform != "gpu":
        row.status, row.reason = "skipped", f"cuDNN attention needs a CUDA device (this is {device.platform})"
        return row
    config = experiment_config(stage, tiny, args)
    config.model.llm.attention_impl = impl
    if impl == "cudnn" and config.model.llm.dtype not in ("bfloat16", "float16"):
        config.model.llm.dtype = "bfloat16"   # cuDNN takes bf16 / fp16 only (the tiny config computes in f32)
    model_cfg = cfg_lib.model_config(config)
    host_batch = batch_for(model_cfg, stage, buckets, args.batch)
    c1 = 1 + (buckets["C"] if stage == "fpo" else 0)
    row.tokens_per_step = args.batch * (buckets["P"] + c1 * buckets["R"])
    row.frames_per_step = args.batch * buckets["N"]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    setup = loop.build_train_step(config, stage, model_cfg, mesh, total_steps=1000)
    with_reference = stage == "fpo" and config.loss.fpo_reference == "frozen_params"
    try:
        with jax.set_mesh(mesh):
            params = jax.jit(lambda: loop.init_params(model_cfg, 0), out_shardings=setup.param_shardings)()
            trainable, frozen = partition.split(params, setup.patterns)
            reference = params if with_reference else None
            if not with_reference:
                del params
            state = jax.jit(lambda t: init_state(t, setup.tx, jax.random.key(1)),
                            out_shardings=setup.state_shardings)(trainable)
            del trainable
            batch = sharding.host_batch_to_global({k: host_batch[k] for k in setup.batch_keys}, mesh,
                                                  model_cfg.llm.sharding_rules)
            t0 = time.perf_counter()
            compiled = setup.jit(with_reference).lower(state, frozen, batch, reference).compile()
            row.compile_s = time.perf_counter() - t0
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            row.hardware_flops = float((cost or {}).get("flops", 0.0)) * args.micro_batches or None
            for _ in range(args.warmup):
                state, metrics = compiled(state, frozen, batch, reference)
            jax.block_until_ready(metrics)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                state, metrics = compiled(state, frozen, batch, reference)
                jax.block_until_ready(metrics)
                row.step_s_all.append(time.perf_counter() - t0)
            row.step_s = statistics.median(row.step_s_all)
            stats = device.memory_stats() or {}
            row.peak_memory_bytes = stats.get("peak_bytes_in_use")
        row.model_flops = model_flops(config, stage, host_batch)
    except Exception as e:  # noqa: BLE001 - a variant that cannot run is a row, not a crash
        message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        row.status = "OOM" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower() else "error"
        row.reason = message
    finally:
        state = frozen = batch = reference = compiled = None  # noqa: F841 - free the device between variants
        gc.collect()
    return row


def format_table(rows: list[Row], peak_table: float | None, peak_measured: float | None) -> str:
    head = (f"{'stage':>5} {'attention':>9} {'batch':>5} {'step ms':>9} {'tokens/s':>10} {'frames/s':>9} "
            f"{'TFLOP/step':>10} {'MFU tbl':>7} {'MFU meas':>8} {'peak GiB':>8} {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.stage:>5} {r.impl:>9} {r.batch:>5}  {r.status}: {r.reason}")
            continue
        pct = lambda x: f"{100 * x:6.1f}%" if x is not None else f"{'-':>7}"  # noqa: E731
        lines.append(
            f"{r.stage:>5} {r.impl:>9} {r.batch:>5} {1e3 * r.step_s:9.1f} {r.tokens_per_s:10.1f} "
            f"{r.frames_per_step / r.step_s:9.2f} "
            f"{(r.model_flops or 0) / 1e12:10.2f} {pct(r.mfu(peak_table)):>7} {pct(r.mfu(peak_measured)):>8} "
            f"{(r.peak_memory_bytes or 0) / 2**30:8.2f} {r.compile_s:9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,fpo")
    parser.add_argument("--impls", default="xla,cudnn", help="attention implementations to compare")
    parser.add_argument("--tiny", action="store_true", help="configs/synthetic.py (automatic without a GPU)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step on the device")
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--frames", type=int, default=None, help="frames per row (default: the config's largest bucket)")
    parser.add_argument("--remat", default=None, help="remat policy (default: the config's)")
    parser.add_argument("--lm_logits_chunk", type=int, default=None, help="model.lm_logits_chunk (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (>= 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=8192, help="size of the bf16 matmul peak measurement (0 = skip)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")

    device = jax.devices()[0]
    tiny = args.tiny or device.platform != "gpu"
    buckets = dict(TINY_BUCKETS if tiny else FULL_BUCKETS)
    if args.frames:
        buckets["N"] = args.frames
    matmul_n = min(args.matmul, 1024) if tiny else args.matmul
    peak_table = table_peak(device.device_kind)
    peak_measured = measured_matmul_peak(matmul_n) if matmul_n else None
    print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, host {platform.node()} "
          f"{os.cpu_count()} CPUs; {'tiny' if tiny else 'full-size'} config, buckets {buckets}")
    print(f"bf16 peak: table {peak_table / 1e12 if peak_table else float('nan'):.0f} TFLOP/s, "
          f"measured ({matmul_n}^3 matmul) {peak_measured / 1e12 if peak_measured else float('nan'):.1f} TFLOP/s",
          flush=True)
    rows = []
    for stage in args.stages.split(","):
        for impl in args.impls.split(","):
            rows.append(run_variant(stage, impl, tiny, buckets, args, device))
            print(format_table(rows[-1:], peak_table, peak_measured).splitlines()[-1], flush=True)
    print(format_table(rows, peak_table, peak_measured))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                       "tiny": tiny, "buckets": buckets, "argv": vars(args),
                       "peak_bf16_table": peak_table, "peak_bf16_measured": peak_measured,
                       "rows": [dict(dataclasses.asdict(r), tokens_per_s=r.tokens_per_s, mfu_table=r.mfu(peak_table),
                                     mfu_measured=r.mfu(peak_measured)) for r in rows]}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
