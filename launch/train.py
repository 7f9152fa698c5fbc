r"""Trains D²VLM: SFT and/or FPO stages, resumable, on a device mesh.

Examples:
  # the embedded default (synthetic videos, tiny model, CPU, minutes)
  python launch/train.py --config configs/synthetic.py --workdir workdir/synthetic
  # full size, overriding fields
  python launch/train.py --config configs/d2vlm_phi3_sft.py --workdir /gcs/bucket/run1 \
      --config.sft.batch_size=64 --config.mesh.fsdp=8

Every host of a multi-host job (Cloud TPU pod, GPU cluster) runs the same command;
``jax.distributed.initialize()`` is called when more than one process is configured
(TPU pods detect this automatically; elsewhere pass --coordinator_address, --num_processes,
--process_id). The workdir is a filesystem path every process sees (a gcsfuse mount of a
bucket on Cloud TPU, docs/TPU.md); gs:// URLs are not supported. A killed run restarts from
its newest checkpoint when started again with the same --workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from d2vlm_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py[:arg]); override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and exported params.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs outside TPU pods.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                                  "Multi-process runs: a process silent this long counts as dead and the "
                                  "distributed runtime stops the others (JAX's default is 100 s).")
_MULTIHOST = flags.DEFINE_boolean("multihost", False, "Call jax.distributed.initialize() with auto-detection "
                                  "(Cloud TPU pods, SLURM).")
_CHECK_CONFIG = flags.DEFINE_boolean(
    "check_config", False, "Only validate the command line: load the config with its overrides, check the "
    "stages, model, loss and trainable tables, print the resolved config and exit (0 = valid, 2 = invalid). "
    "No devices, data or checkpoints are touched, so a pod command can be checked before renting the slice.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Delete what an earlier run wrote in --workdir (stage directories, eval/, config.json; the "
    "config history is kept) and train from scratch. Without it, a workdir restarts only with its own config or a "
    "change that is safe to apply (d2vlm_jax/train/workdir.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # cli.run rejects positional arguments
    if _CHECK_CONFIG.value:
        from d2vlm_jax.config import validate
        lines = validate(_CONFIG.value)
        print(_CONFIG.value.to_json_best_effort(indent=2))
        print("\n".join(["config OK, workdir " + _WORKDIR.value] + lines), flush=True)
        return
    import jax
    if _COORDINATOR.value or _MULTIHOST.value:
        kwargs = dict(heartbeat_timeout_seconds=_HEARTBEAT.value)
        if _COORDINATOR.value:
            kwargs.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                          process_id=_PROCESS_ID.value)
        jax.distributed.initialize(**kwargs)
    from d2vlm_jax.train import loop
    name = "train.log" if jax.process_count() == 1 else f"train.process_{jax.process_index()}.log"
    log_file = cli.add_log_file(os.path.join(_WORKDIR.value, name))
    if jax.process_index() == 0:
        print(f"d2vlm-jax: {jax.process_count()} process(es), {jax.device_count()} device(s) "
              f"({jax.devices()[0].platform}), workdir {_WORKDIR.value} (library logs: {log_file})", flush=True)
    loop.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    cli.run(main, config_flag="config")
