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


def test_flops_count_every_frame_chunk():
    """XLA's cost analysis counts a loop body once; the vision tower's frame-chunk scan runs C
    times. The report counts every chunk: chunked and unchunked steps have the same FLOPs."""
    require_libtpu()
    devices = cc.topology_devices(TOPOLOGY)
    reports = {}
    for chunks in (1, 2):
        config = tiny_config()
        config.model.video.vision.frame_chunks = chunks
        reports[chunks] = cc.check(config, topology=TOPOLOGY, stage="sft", devices=devices)
        assert reports[chunks].error is None, reports[chunks].error
    one, two = reports[1], reports[2]
    from d2vlm_jax.config import model_config
    frames = one.batch_shapes["frames"][0] * one.batch_shapes["frames"][1]
    half_tower = cc.vision_tower_flops(model_config(tiny_config()).video.vision, frames) / 2
    # the correction matters here (what a single count of the loop body would drop) ...
    assert half_tower / one.step_flops > 0.02
    # ... and with it the two programs agree far closer than that
    assert two.step_flops == pytest.approx(one.step_flops, rel=0.005)
    assert two.model_flops == pytest.approx(one.model_flops, rel=1e-6)


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
