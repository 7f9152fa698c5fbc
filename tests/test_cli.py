"""One-line errors (exit code 2) for the ordinary mistakes of launch/train.py's users, and the
override checker behind them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.smoke_data import data_flags, make_smoke_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")


def train(workdir, *extra, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, TRAIN, "--config", "configs/synthetic.py:smoke", "--workdir",
                           str(workdir), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(result, warnings_allowed: int = 0) -> str:
    """The one ``error:`` line (the last on stderr); at most ``warnings_allowed`` lines before it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert len(lines) <= 1 + warnings_allowed and all(x.startswith("warning: ") for x in lines[:-1]), lines
    return lines[-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_smoke_data(tmp_path_factory.mktemp("cli_data"))


def test_override_checker_names_the_flag_and_suggests():
    from d2vlm_jax import cli
    from configs import synthetic
    cfg = synthetic.get_config("smoke")
    cli.check_override(cfg, "sft.steps", "--config.sft.steps=3", "x.py")
    with pytest.raises(cli.UsageError, match=r"no field 'stepz' at sft; did you mean --config\.sft\.steps"):
        cli.check_override(cfg, "sft.stepz", "--config.sft.stepz=3", "x.py")
    with pytest.raises(cli.UsageError, match=r"no field 'some' at the top level; fields at the top level: checkpoint"):
        cli.check_override(cfg, "some.unknown_key", "--config.some.unknown_key=1", "x.py")
    with pytest.raises(cli.UsageError, match=r"did you mean --config\.model\.llm\.num_layers"):
        cli.check_override(cfg, "model.llm.num_layer", "--config.model.llm.num_layer=1", "x.py")
    with pytest.raises(cli.UsageError, match=r"config\.sft\.steps is a value \(int\), not a section"):
        cli.check_override(cfg, "sft.steps.x", "--config.sft.steps.x=1", "x.py")
    assert cli._config_overrides(["prog", "--config", "c.py", "--config.a.b=1", "--noconfig.c", "--config.d", "2"],
                                 "config") == ("c.py", [("--config.a.b=1", "a.b"), ("--noconfig.c", "c"),
                                                        ("--config.d", "d")])


def test_command_line_mistakes_are_one_line(tmp_path):
    cases = [
        (("--config.some.unknown_key=1",), "--config.some.unknown_key=1: configs/synthetic.py:smoke has no field 'some'"),
        (("--config.sft.stepz=6",), "did you mean --config.sft.steps"),
        (("--config.sft.steps=abc",), "--config.sft.steps=abc"),
        (("--workdirr=x",), "Unknown command line flag 'workdirr'"),
        (("stray",), "unexpected arguments: stray"),
        (("--config.mesh.data=3",), "config.mesh"),
    ]
    for extra, expected in cases:
        assert expected in one_error_line(train(tmp_path / "wd", *extra)), extra
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    missing = subprocess.run([sys.executable, TRAIN, "--config", "configs/synthetc.py", "--workdir", str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "config file configs/synthetc.py not found (did you mean configs/synthetic.py?)" in one_error_line(missing)


def test_bad_inputs_are_one_line(tmp_path, data_dir):
    flags = data_flags(data_dir)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"video": "videos/train_00000.mp4", "duration": 5.0,,}]')
    line = one_error_line(train(tmp_path / "a", *flags, "--config.stages=('sft',)",
                                f"--config.data.train_annotations={broken}"))
    assert "data.train_annotations" in line and str(broken) in line and "invalid JSON" in line
    line = one_error_line(train(tmp_path / "b", *flags, "--config.stages=('sft',)",
                                f"--config.data.video_root={tmp_path / 'nowhere'}"), warnings_allowed=5)
    assert "every one of the 18 samples" in line and "video_not_found 18" in line and "data.video_root" in line
    assert str(tmp_path / "nowhere") in line
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"video": "x.mp4"}))
    line = one_error_line(train(tmp_path / "c", *flags, "--config.stages=('sft',)",
                                f"--config.data.train_annotations={not_a_list}"))
    assert "expected a JSON list" in line
