"""launch/tpu/*.sh against a test double of ``gcloud``: the commands the scripts issue (create,
setup, train, resume after a preemption) and the remote commands they send to every worker.

The double records every call; ``tpu-vm ssh --command CMD`` checks CMD's syntax with ``bash -n``
and, for the train command, runs it here: the worker's checkout (``~/d2vlm-jax``) is this
repository with a ``.venv/bin/python`` that adds ``--check_config``, so ``launch/train.py``
really parses the pod's command line (config file, every ``--config.*`` override) and
validates the config, without training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GCLOUD = r'''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
def option(name):
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None
if args[:3] == ["config", "get-value", "project"]:
    print("test-project")
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print(os.environ.get("FAKE_QR_STATE", "ACTIVE"))
elif args[:4] == ["compute", "tpus", "queued-resources", "create"]:
    open(os.path.join(os.environ["FAKE_GCLOUD_DIR"], "created"), "w").close()
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:  # a slice created here is READY
    created = os.path.exists(os.path.join(os.environ["FAKE_GCLOUD_DIR"], "created"))
    state = "READY" if created else os.environ.get("FAKE_VM_STATE", "READY")
    if state == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    print(state)
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(os.environ["FAKE_GCLOUD_DIR"], "scp_" + os.path.basename(args[4])))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = option("--command")
    n = len(open(os.environ["FAKE_GCLOUD_LOG"]).readlines())
    with open(os.path.join(os.environ["FAKE_GCLOUD_DIR"], f"ssh_{{n}}.sh"), "w") as f:
        f.write(command)
    if subprocess.run(["bash", "-n", "-c", command]).returncode:
        sys.exit("remote command has a bash syntax error")
    if "launch/train.py" in command and os.environ.get("FAKE_RUN_TRAIN") == "1":
        sys.exit(subprocess.run(["bash", "-c", command]).returncode)
'''


@pytest.fixture
def tpu_env(tmp_path):
    """Environment for the scripts: gcloud double on PATH, a fake home with the checkout."""
    fakebin, record, home = tmp_path / "bin", tmp_path / "gcloud", tmp_path / "home"
    for d in (fakebin, record, home):
        d.mkdir()
    (fakebin / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (fakebin / "gcloud").chmod(0o755)
    # the worker's checkout: this repository's code, and a python that only validates
    checkout = home / "d2vlm-jax"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    for name in ("launch", "configs", "d2vlm_jax"):
        (checkout / name).symlink_to(os.path.join(ROOT, name))
    stub = checkout / ".venv" / "bin" / "python"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}/train_argv.txt\n'
                    f'exec {sys.executable} "$@" --check_config\n')
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}", HOME=str(home), FAKE_GCLOUD_LOG=str(record / "log"),
               FAKE_GCLOUD_DIR=str(record), BUCKET="gs://my-bucket/team", RUN="sft1", TPU_NAME="d2vlm-test",
               ZONE="us-west4-a", ACCELERATOR="v5litepod-16", RUNTIME="v2-alpha-tpuv5-lite",
               CONFIG="configs/d2vlm_phi3_v5e.py", MOUNT=str(tmp_path / "gcs"), DATA="gs://my-bucket/data/et")
    env.pop("PROJECT", None)
    return env, record


def run_script(name: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def calls(record) -> list[list[str]]:
    path = record / "log"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def subcommands(record) -> list[str]:
    """'queued-resources create', 'tpu-vm ssh', ... in call order (project lookups left out)."""
    return [" ".join(c[2:4]) for c in calls(record) if c[:2] == ["compute", "tpus"]]


def test_create_asks_for_the_slice_and_waits(tpu_env):
    env, record = tpu_env
    run_script("create.sh", dict(env, SPOT="1"))
    create = calls(record)[1]
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "d2vlm-test-qr"]
    for flag, value in (("--node-id", "d2vlm-test"), ("--accelerator-type", "v5litepod-16"),
                        ("--runtime-version", "v2-alpha-tpuv5-lite"), ("--zone", "us-west4-a"),
                        ("--project", "test-project")):
        assert create[create.index(flag) + 1] == value, flag
    assert "--spot" in create
    assert subcommands(record) == ["queued-resources create", "queued-resources describe", "tpu-vm describe"]


def test_setup_installs_the_checkout_on_every_worker(tpu_env):
    env, record = tpu_env
    run_script("setup.sh", env)
    scp, ssh = [c for c in calls(record) if c[:3] == ["compute", "tpus", "tpu-vm"]]
    assert scp[3] == "scp" and "--worker=all" in scp and scp[5] == "d2vlm-test:~/d2vlm-jax.tar.gz"
    with tarfile.open(record / "scp_d2vlm-jax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "launch/train.py", "d2vlm_jax/train/loop.py", "configs/d2vlm_phi3_v5e.py"} <= names
    assert ssh[3] == "ssh" and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "pip install -q -e '.[tpu]'" in remote
    assert f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket {env['MOUNT']}/my-bucket" in remote
    assert "gcloud storage rsync --recursive gs://my-bucket/data/et /mnt/disks/data" in remote


def test_train_runs_one_valid_command_on_every_worker(tpu_env):
    """The pod command reaches launch/train.py intact and is a valid run of the v5e config."""
    env, record = tpu_env
    out = run_script("train.sh", dict(env, FAKE_RUN_TRAIN="1"), "--config.sft.steps=7",
                     "--config.stages=('sft',)", "--config.init_checkpoint=/gcs/my bucket/etchat params")
    (ssh,) = [c for c in calls(record) if c[2:4] == ["tpu-vm", "ssh"]]
    assert "--worker=all" in ssh
    argv = (record / "train_argv.txt").read_text().splitlines()
    workdir = f"{env['MOUNT']}/my-bucket/runs/sft1"
    assert argv[0] == "launch/train.py" and "--multihost" in argv
    assert argv[argv.index("--config") + 1] == "configs/d2vlm_phi3_v5e.py"
    assert argv[argv.index("--workdir") + 1] == workdir
    assert "--config.data.train_annotations=/mnt/disks/data/train.json" in argv
    # overrides with parentheses and spaces arrive as single, unchanged arguments
    assert argv[-3:] == ["--config.sft.steps=7", "--config.stages=('sft',)",
                         "--config.init_checkpoint=/gcs/my bucket/etchat params"]
    # train.py parsed and validated it; every worker's output is kept in the shared workdir
    log = open(os.path.join(workdir, "logs", f"worker_{os.uname().nodename}.log")).read()
    assert f"config OK, workdir {workdir}" in log and "config OK" in out.stdout
    assert '"steps": 7' in log and '"train_annotations": "/mnt/disks/data/train.json"' in log
    assert "sft: batch 16 as 8 micro-batch(es)" in log


def test_train_stops_on_an_invalid_override(tpu_env):
    env, record = tpu_env
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu", "train.sh"), "--config.sft.micro_batches=3"],
                          cwd=ROOT, env=dict(env, FAKE_RUN_TRAIN="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.sft.batch_size=16 is not divisible by config.sft.micro_batches=3" in proc.stdout + proc.stderr


@pytest.mark.parametrize("state, expected", [
    ("READY", ["tpu-vm describe", "tpu-vm ssh"]),
    ("PREEMPTED", ["tpu-vm describe", "queued-resources delete", "queued-resources create", "queued-resources describe",
                   "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]),
    ("MISSING", ["tpu-vm describe", "queued-resources delete", "queued-resources create", "queued-resources describe",
                 "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]),
])
def test_resume_recreates_a_lost_slice_then_runs_the_same_command(tpu_env, state, expected):
    env, record = tpu_env
    run_script("resume.sh", dict(env, FAKE_VM_STATE=state), "--config.sft.steps=7")
    assert subcommands(record) == expected
    train = [c for c in calls(record) if c[2:4] == ["tpu-vm", "ssh"]][-1]
    remote = train[train.index("--command") + 1]
    assert "launch/train.py --multihost --config configs/d2vlm_phi3_v5e.py" in remote
    assert remote.rstrip().split(" 2>&1")[0].endswith("--config.sft.steps=7")
