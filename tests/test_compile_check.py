"""Deviceless TPU compile of the real train step (launch/compile_check.py, d2vlm_jax/compile_check.py).

Needs the tpu extra (libtpu), which CI installs: without it these tests FAIL with a message
saying what to install (they are never skipped).
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from d2vlm_jax import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"   # 4 chips, 16 GiB each
VOCAB, QFORMER_VOCAB = 512, 128

cc.set_libtpu_env()


def require_libtpu() -> None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("libtpu is not installed: the compile-check tests need the project's tpu extra "
                    "(pip install 'jax[tpu]==0.10.2', i.e. pip install -e '.[tpu]')")


def tiny_config():
    sys.path.insert(0, ROOT)
    from configs import synthetic
    c = synthetic.get_config("smoke")
    c.model.llm.vocab_size, c.model.video.qformer.vocab_size = VOCAB, QFORMER_VOCAB
    c.model.llm.num_layers, c.model.k_evi = 2, 1
    c.model.video.vision.depth = c.model.video.vision.output_layer = 1
    c.model.video.qformer.num_layers = 1
    return c


def test_tiny_train_step_compiles_for_a_tpu_topology():
    require_libtpu()
    config = tiny_config()
    devices = cc.topology_devices(TOPOLOGY)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    report = cc.check(config, topology=TOPOLOGY, stage="sft", devices=devices)
    assert report.error is None, report.error
    assert report.plan.mesh == (4, 1, 1) and report.plan.batch_size == config.sft.batch_size
    # the batch comes from the largest buckets (shape_policy "max")
    b = config.sft.batch_size
    assert report.batch_shapes["frames"] == (b, 16, 56, 56, 3)
    assert report.batch_shapes["prefix_ids"] == (b, 96) and report.batch_shapes["response_ids"] == (b, 64)
    # arguments hold at least this device's share of the state, the frozen params and the batch
    from d2vlm_jax.config import model_config
    from d2vlm_jax.train import loop
    params = jax.tree.leaves(loop.abstract_boxed_variables(model_config(config)))
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in params)
    assert report.argument_bytes >= param_bytes  # (4-way data parallel: params are replicated)
    # the peak holds the arguments, the outputs that are not donated buffers and the step's
    # activations on top (libtpu's temp_bytes alone can read 0 here: docs/TPU.md)
    assert report.output_bytes > 0 and report.temp_bytes >= 0
    assert report.peak_bytes > report.argument_bytes + report.output_bytes - report.alias_bytes
    assert report.parts_bytes == (report.argument_bytes + report.output_bytes + report.temp_bytes
                                  - report.alias_bytes + report.code_bytes)
    assert report.total_bytes == max(report.parts_bytes, report.peak_bytes + report.code_bytes)
    assert report.alias_bytes > 0, "the train state is donated: its buffers must alias the outputs"
    assert report.fits and report.hbm_per_device == 16 * cc.GIB
    assert report.flops_per_device > 0 and report.model_flops and report.model_flops > 0
    assert report.roofline_seconds == pytest.approx(report.step_flops / (4 * 197e12))
    text = report.format(0.4)
    assert "total" in text and "FLOPs per step" in text and "MFU" in text


def test_flops_count_every_loop():
    """XLA's cost analysis counts a loop body once; the report counts every loop (frame
    chunks, scanned layer stacks, micro-batches) by its trip count, so the chunked, the
    scanned and the plain step have the same FLOPs, and on the plain step the count is XLA's."""
    require_libtpu()
    devices = cc.topology_devices(TOPOLOGY)

    def variant(chunks=1, scan=False):
        config = tiny_config()
        config.model.video.vision.depth = config.model.video.vision.output_layer = 2
        config.model.video.qformer.num_layers = 2
        config.model.video.vision.frame_chunks = chunks
        config.model.scan_layers = scan
        report = cc.check(config, topology=TOPOLOGY, stage="sft", devices=devices)
        assert report.error is None, report.error
        return report

    plain, chunked, scanned = variant(), variant(chunks=2), variant(scan=True)
    # the loop-free program: the HLO count is XLA's own
    assert plain.flops_per_device == pytest.approx(plain.xla_flops_per_device, rel=0.01)
    # XLA drops what the loops repeat (one frame chunk; all but one layer per stack) ...
    assert chunked.xla_flops_per_device < 0.98 * plain.xla_flops_per_device
    assert scanned.xla_flops_per_device < 0.9 * plain.xla_flops_per_device
    # ... the report does not: 2 chunks, and loops of 2 layers, 2 blocks, 1 Q-Former block
    assert 2 in chunked.loop_trip_counts and scanned.loop_trip_counts.count(2) >= 2
    assert chunked.step_flops == pytest.approx(plain.step_flops, rel=0.005)
    assert scanned.step_flops == pytest.approx(plain.step_flops, rel=0.02)
    # model FLOPs are those of the program as written, whatever the loops
    assert chunked.model_flops == pytest.approx(plain.model_flops, rel=1e-6)
    assert scanned.model_flops == pytest.approx(plain.model_flops, rel=1e-6)
    # the compile's host cost is measured
    assert plain.compile_seconds > 0 and plain.host_peak_rss_bytes > 100e6
    assert plain.host_peak_rss_scope == "compile"  # Linux: VmHWM reset before each plan
    assert "host peak RSS" in plain.format()


def test_plan_that_cannot_fit_is_reported_with_its_shortfall():
    require_libtpu()
    config = tiny_config()
    config.model.llm.vocab_size = 4_000_000   # 2 x 2 GiB of f32 embeddings + Adam state, replicated
    report = cc.check(config, topology=TOPOLOGY, stage="sft", model_flops=False)
    assert not report.fits
    assert report.oom
    if report.error is None:   # compiled, but the buffers exceed HBM
        assert report.shortfall_bytes > 0 and report.total_bytes > 16 * cc.GIB
        assert "DOES NOT FIT" in report.format()
    else:                      # XLA refused it: the report names the buffers that did not fit
        assert "RESOURCE_EXHAUSTED" in report.error or "memory" in report.error.lower()
        assert report.largest_buffers and any("4000000" in row for row in report.largest_buffers[:3]), \
            report.largest_buffers
        assert "largest live buffers" in report.format()


def test_launcher_without_libtpu_says_what_to_install(tmp_path):
    # a `libtpu` that cannot be imported shadows the real one
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError('simulated: no libtpu')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "compile_check.py"), "--config",
                        "configs/synthetic.py:smoke", "--topology", TOPOLOGY], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "libtpu" in r.stderr and "jax[tpu]" in r.stderr


def test_topology_parsing_and_sweep_plans():
    assert cc.chip_of("v5p:2x2x1").hbm_bytes == 95 * cc.GIB and cc.chips_in("v5e:4x4") == 16
    with pytest.raises(cc.CompileCheckError, match="unknown TPU generation"):
        cc.chip_of("v9z:2x2")
    config = tiny_config()
    plans = cc.sweep_plans(config, "sft", 4, remat_policies=("none", "full"))
    assert plans and all((p.batch_size // p.micro_batches) % (p.mesh[0] * p.mesh[1]) == 0 for p in plans)
    assert {p.remat_policy for p in plans} == {"none", "full"}
    assert (4, 1, 1) in {p.mesh for p in plans} and (1, 4, 1) in {p.mesh for p in plans}
    swept = cc.sweep_plans(config, "sft", 4, meshes=[(1, 4, 1)], remat_policies=("full",), batch_sizes=[4, 8])
    assert {p.batch_size for p in swept} == {4, 8}
    assert all(p.batch_size % p.micro_batches == 0 and (p.batch_size // p.micro_batches) % 4 == 0 for p in swept)


def test_total_is_the_larger_of_the_parts_and_the_peak():
    """No libtpu needed: the report's arithmetic. A plan whose libtpu temporaries read 0 but
    whose peak of live bytes exceeds HBM does not fit; one whose parts exceed it does not either."""
    def report(**memory):
        return cc.CompileReport(topology=TOPOLOGY, num_slices=1, stage="sft", plan=cc.Plan((4, 1, 1), "full", 1, 4),
                                batch_shapes={}, chip=cc.chip_of(TOPOLOGY), num_devices=4, num_chips=4, **memory)
    hbm = 16 * cc.GIB
    under_reported = report(argument_bytes=4 * cc.GIB, output_bytes=cc.GIB, alias_bytes=cc.GIB, temp_bytes=0,
                            code_bytes=cc.GIB, peak_bytes=hbm)
    assert under_reported.parts_bytes == 5 * cc.GIB
    assert under_reported.total_bytes == hbm + cc.GIB and not under_reported.fits
    assert under_reported.shortfall_bytes == cc.GIB
    large_parts = report(argument_bytes=4 * cc.GIB, temp_bytes=13 * cc.GIB, peak_bytes=10 * cc.GIB)
    assert large_parts.total_bytes == 17 * cc.GIB and not large_parts.fits
    assert report(argument_bytes=4 * cc.GIB, temp_bytes=8 * cc.GIB, peak_bytes=12 * cc.GIB).fits


def test_hlo_flop_counter_multiplies_loop_bodies_by_their_trip_counts():
    """On the host CPU: a 6-step scan and its unrolled twin, forward and backward."""
    from d2vlm_jax import hlo_cost
    import jax.numpy as jnp

    def scanned(w, x):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0].sum()

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x.sum()

    w, x = jnp.ones((6, 64, 64)), jnp.ones((32, 64))
    matmuls = 6 * 2 * 32 * 64 * 64
    counts = {}
    for name, fn in (("scan", scanned), ("unrolled", unrolled), ("scan grad", jax.grad(scanned)),
                     ("unrolled grad", jax.grad(unrolled))):
        compiled = jax.jit(fn).lower(w, x).compile()
        flops, loops = hlo_cost.program_flops(compiled.as_text())
        xla = compiled.cost_analysis()
        xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
        counts[name] = (flops, loops, xla)
    assert counts["unrolled"][1] == [] and counts["unrolled"][0] == pytest.approx(counts["unrolled"][2], rel=0.01)
    assert counts["unrolled grad"][0] == pytest.approx(counts["unrolled grad"][2], rel=0.01)
    assert [n for _, n in counts["scan"][1]] == [6] and counts["scan"][2] < 0.5 * matmuls  # XLA: body once
    assert counts["scan"][0] == pytest.approx(counts["unrolled"][0], rel=0.03)
    # (the scanned backward does a little more elementwise work around these tiny matmuls)
    assert counts["scan grad"][0] == pytest.approx(counts["unrolled grad"][0], rel=0.05)
    assert counts["scan"][0] >= matmuls
    with pytest.raises(hlo_cost.HloParseError, match="no ENTRY"):
        hlo_cost.program_flops("HloModule empty\n")


def test_convolution_taps_skip_padding_and_dilation_holes():
    """``_valid_taps`` against brute force, on the windows TPU programs use for batched dots."""
    from d2vlm_jax.hlo_cost import _valid_taps

    def brute(size, kernel, out, stride, pad, lhs_dilate, rhs_dilate):
        last = (size - 1) * lhs_dilate
        return sum(1 for o in range(out) for k in range(kernel)
                   if 0 <= (p := o * stride + k * rhs_dilate - pad) <= last and p % lhs_dilate == 0)

    for case in [(16, 16, 16, 15, 0, 16, 1), (4, 4, 4, 3, 0, 4, 1), (96, 96, 96, 1, 95, 1, 1),
                 (14, 3, 12, 1, 0, 1, 1), (10, 3, 5, 2, 1, 1, 2), (7, 4, 9, 2, 3, 2, 1), (1, 1, 1, 1, 0, 1, 1)]:
        assert _valid_taps(*case) == brute(*case), case
