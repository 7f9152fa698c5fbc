"""benchmarks/gpu_step.py keeps working without a GPU: the tiny config's SFT and FPO steps
run and are timed, cuDNN is reported as skipped on CPU, the JSON is written."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_step", os.path.join(ROOT, "benchmarks", "gpu_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_step_runs_the_tiny_config_on_cpu(tmp_path, capsys):
    """The FPO step (the SFT one is the same program without rejected branches)."""
    gpu_step = load_benchmark()
    out = tmp_path / "gpu_step.json"
    rows = gpu_step.main(["--stages", "fpo", "--warmup", "1", "--repeats", "2", "--matmul", "256",
                          "--json", str(out)])
    by = {(r.stage, r.impl): r for r in rows}
    xla = by[("fpo", "xla")]
    assert xla.status == "ok", xla.reason
    assert xla.step_s > 0 and len(xla.step_s_all) == 2 and xla.model_flops > 0 and xla.tokens_per_s > 0
    assert by[("fpo", "cudnn")].status == "skipped" and "CUDA" in by[("fpo", "cudnn")].reason
    assert xla.tokens_per_step == 1 * (96 + 3 * 64)                   # prefix + 3 branches, tiny buckets
    report = json.loads(out.read_text())
    assert report["tiny"] and report["platform"] == "cpu" and len(report["rows"]) == 2
    assert report["peak_bf16_measured"] > 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "skipped" in printed


def test_peak_table_matches_device_kinds():
    gpu_step = load_benchmark()
    assert gpu_step.table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_step.table_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_step.table_peak("NVIDIA H200") == 989e12
    assert gpu_step.table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_step.table_peak("cpu") is None


def test_gpu_step_rejects_zero_repeats():
    with pytest.raises(SystemExit):
        load_benchmark().main(["--repeats", "0"])
