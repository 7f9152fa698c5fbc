r"""Compiles the real train step for a Cloud TPU topology on this (CPU) machine and reports
per-chip memory, FLOPs per step and roofline step time; exit code 1 if the plan does not fit.

Examples:
  python launch/compile_check.py --config configs/d2vlm_phi3_v5p.py --topology v5p:2x2x1
  python launch/compile_check.py --config configs/d2vlm_phi3_v5p.py --topology v5p:2x2x1 --stage fpo
  python launch/compile_check.py --config configs/d2vlm_phi3_v5e.py --topology v5e:4x4 --sweep \
      --sweep_remat=full,dots_with_no_batch_dims_saveable --sweep_micro=1,2
  python launch/compile_check.py --config configs/d2vlm_phi3_v5p.py --topology v5p:2x2x1 --sweep \
      --sweep_meshes=1/4/1 --sweep_batch=8,16 --sweep_remat=full,save:attn_out --sweep_micro=2,4
  python launch/compile_check.py --config configs/synthetic.py --topology v5e:2x2 \
      --config.model.llm.vocab_size=512 --config.model.video.qformer.vocab_size=128

Needs the tpu extra (libtpu): pip install 'jax[tpu]==0.10.2'. Exit codes: 0 fits, 1 does not fit
(out of memory / compile error; with --sweep: no plan fits), 2 bad arguments or no libtpu.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# before JAX starts: compile-only libtpu next to the CPU backend
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from d2vlm_jax.compile_check import set_libtpu_env  # noqa: E402

set_libtpu_env()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:arg]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "Cloud TPU topology, e.g. v5p:2x2x1, v5e:4x4, v6e:2x2.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices over DCN (multi-slice); the data axis spans them.")
_STAGE = flags.DEFINE_enum("stage", "sft", ["sft", "fpo"], "Which stage's train step to compile.")
_SWEEP = flags.DEFINE_boolean("sweep", False, "Try mesh splits x remat policies x micro-batch counts; print a table.")
_SWEEP_REMAT = flags.DEFINE_list("sweep_remat", None, "Remat policies to sweep (default: none,full,dots_saveable,"
                                 "dots_with_no_batch_dims_saveable).")
_SWEEP_MICRO = flags.DEFINE_list("sweep_micro", None, "Micro-batch counts to sweep (default: divisors 1,2,4,8).")
_SWEEP_BATCH = flags.DEFINE_list("sweep_batch", None, "Rows per step to sweep (default: the config's batch size).")
_SWEEP_TENSOR = flags.DEFINE_list("sweep_tensor", ["1", "2", "4"], "Tensor-parallel sizes to sweep.")
_SWEEP_MESHES = flags.DEFINE_list("sweep_meshes", None, "Explicit meshes 'data/fsdp/tensor', e.g. 1/8/1,2/4/1.")
_UTILIZATION = flags.DEFINE_float("utilization", 0.4, "Assumed hardware FLOP utilization for the step-time estimate.")
_MODEL_FLOPS = flags.DEFINE_boolean("model_flops", True, "Also lower the remat-free step for model FLOPs / MFU "
                                    "(with --sweep: for every plan that fits).")
_JSON = flags.DEFINE_string("json_out", None, "Write the report(s) as JSON here.")
_HLO = flags.DEFINE_string("hlo_out", None, "Write the compiled HLO text here (a single check only).")
flags.mark_flags_as_required(["config"])


def _as_json(report) -> dict:
    return {"topology": report.topology, "num_slices": report.num_slices, "stage": report.stage,
            "mesh": dict(zip(("data", "fsdp", "tensor"), report.plan.mesh)), "remat_policy": report.plan.remat_policy,
            "micro_batches": report.plan.micro_batches, "batch_size": report.plan.batch_size,
            "batch_shapes": report.batch_shapes, "num_chips": report.num_chips, "num_devices": report.num_devices,
            "hbm_per_device": report.hbm_per_device, "argument_bytes": report.argument_bytes,
            "output_bytes": report.output_bytes, "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
            "code_bytes": report.code_bytes, "peak_bytes": report.peak_bytes, "total_bytes": report.total_bytes,
            "fits": report.fits,
            "shortfall_bytes": report.shortfall_bytes, "step_flops": report.step_flops,
            "model_flops": report.model_flops, "roofline_seconds": report.roofline_seconds,
            "compile_seconds": report.compile_seconds, "compile_cpu_seconds": report.compile_cpu_seconds,
            "host_peak_rss_bytes": report.host_peak_rss_bytes,
            "host_peak_rss_scope": report.host_peak_rss_scope, "flops_per_device": report.flops_per_device,
            "xla_flops_per_device": report.xla_flops_per_device, "loop_trip_counts": report.loop_trip_counts,
            "mfu_at_utilization": report.mfu(_UTILIZATION.value), "utilization": _UTILIZATION.value,
            "error": report.error, "oom": report.oom}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from d2vlm_jax import compile_check as cc
    from d2vlm_jax.config import ConfigError
    config, stage, util = _CONFIG.value, _STAGE.value, _UTILIZATION.value
    try:
        devices = cc.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
        if not _SWEEP.value:
            report = cc.check(config, topology=_TOPOLOGY.value, stage=stage, num_slices=_NUM_SLICES.value,
                              devices=devices, model_flops=_MODEL_FLOPS.value, hlo_path=_HLO.value)
            print(report.format(util), flush=True)
            reports = [report]
        else:
            meshes = None
            if _SWEEP_MESHES.value:
                meshes = [tuple(int(x) for x in m.split("/")) for m in _SWEEP_MESHES.value]
            elif _SWEEP_TENSOR.value:
                meshes = cc.mesh_candidates(len(devices), [int(t) for t in _SWEEP_TENSOR.value])
            plans = cc.sweep_plans(config, stage, len(devices), meshes=meshes,
                                   remat_policies=_SWEEP_REMAT.value or cc.REMAT_POLICIES,
                                   micro_batches=[int(m) for m in _SWEEP_MICRO.value] if _SWEEP_MICRO.value else None,
                                   batch_sizes=[int(b) for b in _SWEEP_BATCH.value] if _SWEEP_BATCH.value else None)
            if not plans:
                raise cc.CompileCheckError("--sweep: no (mesh, micro-batch) combination divides the batch")
            reports = []
            for i, plan in enumerate(plans):
                print(f"[{i + 1}/{len(plans)}] {plan.label()} ...", flush=True)
                r = cc.check(config, topology=_TOPOLOGY.value, stage=stage, num_slices=_NUM_SLICES.value,
                             plan=plan, devices=devices, model_flops=False)
                if r.fits and _MODEL_FLOPS.value:
                    r.model_flops = cc.model_flops_of(config, stage, plan)
                print("   " + ("fits" if r.fits else ("OOM" if r.oom else "error")) +
                      (f", {r.total_bytes / cc.GIB:.2f} GiB/device" if r.error is None else f": {r.error[:200]}")
                      + f"; compiled in {r.compile_seconds:.0f} s, host peak RSS {r.host_peak_rss_bytes / 1e9:.2f} GB",
                      flush=True)
                reports.append(r)
            print(f"\n{_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s), stage {stage}:\n"
                  + cc.format_table(reports, util), flush=True)
            feasible = [r for r in reports if r.fits]
            if feasible:
                best = min(feasible, key=lambda r: r.roofline_seconds)
                print(f"\nfastest feasible plan: {best.plan.label()} ({best.roofline_seconds * 1e3:.1f} ms roofline, "
                      f"{best.total_bytes / cc.GIB:.2f} GiB/device)", flush=True)
    except cc.NoLibtpuError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (cc.CompileCheckError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump([_as_json(r) for r in reports], f, indent=2)
    if not any(r.fits for r in reports):
        if not _SWEEP.value:
            r = reports[0]
            print(f"error: the plan does not fit on {_TOPOLOGY.value}: "
                  + (r.error if r.error and not r.oom else f"short by {r.shortfall_bytes / cc.GIB:.2f} GiB per device"
                     if r.error is None else f"XLA out of memory: {r.error}"), file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
