"""Multi-host training on one machine: launch/train.py as 2 processes x 2 fake CPU devices over
loopback (``jax.distributed`` with a coordinator on 127.0.0.1).

* the 2-process run reads disjoint data shards, both processes see the same loss, they write
  one checkpoint together, a preempted job resumes from it, and every step equals the same
  global batch on 1 process x 4 devices;
* a dead worker makes the job FAIL promptly instead of hanging: the survivor's distributed
  runtime notices the missing heartbeats (``--heartbeat_timeout_seconds``) and aborts it; the
  harness notices the first failure at once and would kill survivors still alive after a
  grace period (in a collective, without the heartbeat check, the survivor hangs).

The harness (:func:`run_workers`) is the same one would use to drive a local multi-process
run; every worker runs in its own session and is killed by its own process-group id.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np
import pytest

from tests.smoke_data import data_flags, make_smoke_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "train.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS = 8
# The 2-process and the 1-process runs reduce the same rows in a different order and layout
# (rows [p0 rows, p1 rows] vs in stream order; cross-process all-reduce): float32 sums differ
# in the last bits (measured: at most 1.4e-7 relative over the 8 steps, Adam included).
RTOL = 1e-5

# A smaller smoke model (fewer layers) keeps each launch's compile short; everything
# multi-host (mesh over processes, data sharding, Orbax, Grain state) is unchanged.
SMALL_MODEL = ["--config.model.llm.num_layers=2", "--config.model.k_evi=1", "--config.model.video.vision.depth=1",
               "--config.model.video.vision.output_layer=1", "--config.model.video.qformer.num_layers=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_flags(workdir, data_dir) -> list[str]:
    # shuffle off: the 2-process shards [0::2], [1::2] then cover exactly the rows of the
    # 1-process stream's global batches (same samples, same epochs, so the same examples)
    return ["--config", "configs/synthetic.py:smoke", "--workdir", str(workdir), *data_flags(data_dir), *SMALL_MODEL,
            "--config.stages=('sft',)", "--config.final_eval=False", f"--config.sft.steps={STEPS}",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False",
            "--config.log_example_ids=True", "--config.data.shuffle=False", "--config.data.read_threads=1"]


def worker_env(devices: int, cache_dir: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# ------------------------------------------------------------------------------ harness


@dataclasses.dataclass
class JobResult:
    """Outcome of a multi-process job.

    Attributes:
      returncodes: exit status per worker (negative: killed by that signal).
      first_failure: index of the first worker seen exiting nonzero (None: none failed).
      failure_seen_at: seconds since start when that failure was noticed.
      finished_at: seconds since start when the last worker was gone.
      killed_by_harness: workers the harness had to kill (they did not exit on their own).
      timed_out: the whole job ran past ``timeout`` and was killed.
      logs: combined stdout/stderr per worker.
    """
    returncodes: list[int]
    first_failure: int | None
    failure_seen_at: float | None
    finished_at: float
    killed_by_harness: list[int]
    timed_out: bool
    logs: list[str]

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.first_failure is None and all(rc == 0 for rc in self.returncodes)

    def tail(self, n: int = 2500) -> str:
        return "\n".join(f"--- worker {i} (rc {rc}) ---\n{log[-n:]}"
                         for i, (rc, log) in enumerate(zip(self.returncodes, self.logs)))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL one worker's process group (the worker and anything it started), by its id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_workers(cmds: Sequence[Sequence[str]], envs: Sequence[dict], log_dir: str, *, timeout: float,
                grace: float = 20.0, on_poll: Callable[[list[subprocess.Popen], float], None] | None = None
                ) -> JobResult:
    """Runs one process per command and waits for all of them.

    A worker exiting nonzero marks the job failed: the others get ``grace`` seconds to exit
    on their own (JAX's coordination service normally stops them), then they are killed.
    Past ``timeout`` every worker is killed. ``on_poll(procs, elapsed)`` runs every 50 ms
    (tests use it to kill a worker at a chosen moment).
    """
    os.makedirs(log_dir, exist_ok=True)
    paths = [os.path.join(log_dir, f"worker_{i}.log") for i in range(len(cmds))]
    files = [open(p, "w") for p in paths]
    start = time.monotonic()
    procs = [subprocess.Popen(list(c), cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for c, e, f in zip(cmds, envs, files)]
    first_failure = failure_seen_at = None
    killed: list[int] = []
    timed_out = False
    try:
        while True:
            elapsed = time.monotonic() - start
            codes = [p.poll() for p in procs]
            if first_failure is None:
                failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
                if failed:
                    first_failure, failure_seen_at = failed[0], elapsed
            if all(rc is not None for rc in codes):
                break
            if first_failure is not None and elapsed - failure_seen_at > grace:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        _kill(p)
                        killed.append(i)
            if elapsed > timeout:
                timed_out = True
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        _kill(p)
                        killed.append(i)
            if on_poll is not None:
                on_poll(procs, elapsed)
            time.sleep(0.05)
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:  # never leave a worker behind (an exception in on_poll, a failed wait)
            if p.poll() is None:
                _kill(p)
                p.wait(timeout=30)
        for f in files:
            f.close()
    logs = [open(p).read() for p in paths]
    return JobResult(returncodes=[p.returncode for p in procs], first_failure=first_failure,
                     failure_seen_at=failure_seen_at, finished_at=time.monotonic() - start,
                     killed_by_harness=sorted(set(killed)), timed_out=timed_out, logs=logs)


def multihost_job(workdir, data_dir, cache_dir, log_dir, *, timeout=420.0, grace=20.0, on_poll=None,
                  extra: Sequence[str] = ()) -> JobResult:
    port = free_port()
    cmds = [[sys.executable, LAUNCH, *train_flags(workdir, data_dir), *extra, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={NUM_PROCESSES}", f"--process_id={i}"] for i in range(NUM_PROCESSES)]
    envs = [worker_env(DEVICES_PER_PROCESS, cache_dir)] * NUM_PROCESSES
    return run_workers(cmds, envs, log_dir, timeout=timeout, grace=grace, on_poll=on_poll)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The smoke dataset (18 training samples)."""
    return make_smoke_data(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Persistent compilation cache shared by the launches of this module (a resumed or
    repeated job reuses the compiled step)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def rows_by_step(path) -> dict[int, dict]:
    """Last record per step (a preempted run may have logged a step the resumed run redid)."""
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def train_metrics(workdir) -> dict[int, dict]:
    with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if r["split"] == "train"}


# ------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_two_processes_shard_agree_checkpoint_resume_and_match_one_process(tmp_path, data_dir, cache_dir):
    wd = tmp_path / "multi"
    ckpt4 = wd / "sft" / "checkpoints" / "4"
    preempted = {}

    def preempt_after_step_4(procs, elapsed):
        if not preempted and ckpt4.exists():
            preempted["at"] = elapsed
            for p in procs:
                _kill(p)

    first = multihost_job(wd, data_dir, cache_dir, tmp_path / "logs1", on_poll=preempt_after_step_4)
    assert preempted, "the checkpoint at step 4 never appeared\n" + first.tail()
    assert not (wd / "sft" / "DONE.json").exists(), "the job finished before the preemption"

    # one checkpoint, written by both processes together: one state (with a shard file per
    # process), one data-iterator state per process
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(ckpt4 / "data_iter"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(ckpt4 / "state"))
    assert (ckpt4 / "commit_success.txt").exists() and (ckpt4 / "state" / "commit_success.txt").exists()

    resumed = multihost_job(wd, data_dir, cache_dir, tmp_path / "logs2")
    assert resumed.ok, resumed.tail()
    assert "[sft] resumed from step 4" in resumed.logs[0]
    assert "[sft] step 8/8" in resumed.logs[0]
    # only process 0 writes metrics and progress lines
    assert "[sft] step" not in resumed.logs[1] and "resumed from" not in resumed.logs[1]
    assert json.load(open(wd / "sft" / "DONE.json"))["steps"] == STEPS

    # the same global batch on 1 process x 4 devices, uninterrupted
    single_wd = tmp_path / "single"
    single = run_workers([[sys.executable, LAUNCH, *train_flags(single_wd, data_dir)]],
                         [worker_env(NUM_PROCESSES * DEVICES_PER_PROCESS, cache_dir)], str(tmp_path / "logs3"),
                         timeout=420)
    assert single.ok, single.tail()
    assert "1 process(es), 4 device(s)" in single.logs[0] and "2 process(es), 4 device(s)" in resumed.logs[0]

    # data: disjoint shards whose union per step is the 1-process global batch
    p0 = rows_by_step(wd / "sft" / "examples.process_0.jsonl")
    p1 = rows_by_step(wd / "sft" / "examples.process_1.jsonl")
    ref = rows_by_step(single_wd / "sft" / "examples.process_0.jsonl")
    assert sorted(p0) == sorted(p1) == sorted(ref) == list(range(1, STEPS + 1))
    ids0 = {i for r in p0.values() for i in r["example_id"]}
    ids1 = {i for r in p1.values() for i in r["example_id"]}
    assert ids0 and ids1 and not ids0 & ids1, f"process shards overlap: {sorted(ids0 & ids1)}"
    for step in ref:
        assert len(p0[step]["example_id"]) == len(p1[step]["example_id"]) == 2
        assert sorted(p0[step]["example_id"] + p1[step]["example_id"]) == sorted(ref[step]["example_id"]), step

    # both processes saw the same (global) loss at every step, before and after the resume
    for step in p0:
        assert p0[step]["loss"] == p1[step]["loss"], (step, p0[step]["loss"], p1[step]["loss"])

    # every step equals the 1-process run (steps 5-8 come from the resumed job)
    multi, one = train_metrics(wd), train_metrics(single_wd)
    assert sorted(multi) == sorted(one) == list(range(1, STEPS + 1))
    worst = max(abs(multi[s][k] - one[s][k]) / abs(one[s][k]) for s in one
                for k in ("loss/total", "loss/lm", "loss/gnd", "grad_norm"))
    print(f"2 processes vs 1 process: max relative difference {worst:.2e} over {STEPS} steps")
    for step in one:
        for key in ("loss/total", "loss/lm", "loss/gnd", "grad_norm"):
            np.testing.assert_allclose(multi[step][key], one[step][key], rtol=RTOL, err_msg=f"{key} at step {step}")
        assert multi[step]["loss/total"] == p0[step]["loss"]
    # and training did move: the comparison is not between two constant curves
    assert one[STEPS]["loss/total"] < one[1]["loss/total"]


@pytest.mark.slow
def test_dead_worker_fails_the_job_promptly(tmp_path, data_dir, cache_dir):
    wd = tmp_path / "wd"
    ckpt2 = wd / "sft" / "checkpoints" / "2"
    victim = 1
    kill = {}

    def kill_worker_once_training(procs, elapsed):
        if not kill and ckpt2.exists():
            kill["at"] = elapsed
            _kill(procs[victim])

    heartbeat, grace = 10, 30.0
    result = multihost_job(wd, data_dir, cache_dir, tmp_path / "logs", grace=grace, on_poll=kill_worker_once_training,
                           extra=["--config.sft.steps=400", f"--heartbeat_timeout_seconds={heartbeat}"])
    assert kill, "training never reached the checkpoint at step 2\n" + result.tail()
    assert not result.ok and not result.timed_out, result.tail()
    assert result.first_failure == victim and result.returncodes[victim] == -signal.SIGKILL
    # the failure was noticed at once and the whole job was gone within the grace period
    assert result.failure_seen_at - kill["at"] < 2.0
    assert result.finished_at - kill["at"] < grace + 5.0, result.tail()
    survivor = 1 - victim
    assert result.returncodes[survivor] != 0, "the survivor reported success after its peer died"
    assert not (wd / "sft" / "DONE.json").exists()
    # JAX's coordination service stops the survivor by itself once the victim misses its
    # heartbeats (--heartbeat_timeout_seconds); the harness kill is only the fallback
    assert survivor not in result.killed_by_harness, "the survivor hung until the harness killed it\n" + result.tail()
    assert "stopped sending heartbeats" in result.logs[survivor]
    print(f"survivor: rc {result.returncodes[survivor]}, "
          f"{'killed by the harness' if survivor in result.killed_by_harness else 'exited on its own'} "
          f"{result.finished_at - kill['at']:.1f} s after the kill")


# A test double of SLURM's srun: starts the task command FAKE_SRUN_TASKS times on this machine
# with SLURM_PROCID / SLURM_NTASKS set; --kill-on-bad-exit kills the others when one fails.
FAKE_SRUN = r"""#!/usr/bin/env bash
kill_on_bad_exit=0
if [[ "$1" == --kill-on-bad-exit=1 ]]; then kill_on_bad_exit=1; shift; fi
n="${FAKE_SRUN_TASKS:?}"
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NTASKS=$n "$@" & pids+=($!); done
rc=0
for ((k = 0; k < n; k++)); do
  if ! wait -n; then
    rc=1
    if ((kill_on_bad_exit)); then kill "${pids[@]}" 2>/dev/null || true; fi
  fi
done
exit $rc
"""
# scontrol show hostnames: the first node hosts the coordinator; a long list (a reader that
# stops after the first line would make the writer die of SIGPIPE)
FAKE_SCONTROL = "#!/usr/bin/env bash\necho 127.0.0.1\nfor i in $(seq 2 50000); do echo node$i; done\n"


@pytest.mark.slow
def test_slurm_sbatch_script_runs_the_multihost_job(tmp_path, data_dir, cache_dir):
    """launch/slurm/train.sbatch as sbatch would run it (srun / scontrol replaced by local test
    doubles): 2 tasks join one job through the coordinator on the first node, train, export;
    extra overrides with quotes and parentheses reach train.py intact."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fakebin / name).write_text(text)
        (fakebin / name).chmod(0o755)
    wd = tmp_path / "slurm run"  # a space in the path: quoting is part of what is tested
    flags = train_flags(wd, data_dir)
    assert flags[:2] == ["--config", "configs/synthetic.py:smoke"] and flags[2] == "--workdir"
    overrides = flags[4:]
    assert "--config.stages=('sft',)" in overrides
    env = dict(worker_env(DEVICES_PER_PROCESS, cache_dir), PATH=f"{fakebin}:{os.environ['PATH']}",
               PYTHON=sys.executable, SLURM_JOB_NODELIST="node[1-2]", COORDINATOR_PORT=str(free_port()),
               FAKE_SRUN_TASKS=str(NUM_PROCESSES))
    result = run_workers([["bash", "launch/slurm/train.sbatch", "configs/synthetic.py:smoke", str(wd), *overrides]],
                         [env], str(tmp_path / "logs"), timeout=420)
    logs = [(wd / "logs" / f"process_{i}.log").read_text() for i in range(NUM_PROCESSES)
            if (wd / "logs" / f"process_{i}.log").exists()]
    assert result.ok, result.tail() + "\n".join(log[-2000:] for log in logs)
    assert len(logs) == NUM_PROCESSES
    # process 0 prints the job line; every process writes its own library log
    assert "2 process(es), 4 device(s)" in logs[0] and "process(es)" not in logs[1]
    assert all((wd / f"train.process_{i}.log").exists() for i in range(NUM_PROCESSES))
    assert f"[sft] step {STEPS}/{STEPS}" in logs[0] and "[sft] step" not in logs[1]
    assert json.load(open(wd / "sft" / "DONE.json"))["steps"] == STEPS
    p0 = rows_by_step(wd / "sft" / "examples.process_0.jsonl")
    p1 = rows_by_step(wd / "sft" / "examples.process_1.jsonl")
    assert sorted(p0) == sorted(p1) == list(range(1, STEPS + 1))
    ids0 = {i for r in p0.values() for i in r["example_id"]}
    ids1 = {i for r in p1.values() for i in r["example_id"]}
    assert ids0 and ids1 and not ids0 & ids1
    assert all(p0[s]["loss"] == p1[s]["loss"] for s in p0)
