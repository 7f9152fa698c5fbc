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

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CHECK_CONFIG.value:
        from d2vlm_jax.config import ConfigError, validate
        try:
            lines = validate(_CONFIG.value)
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
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
    logging.getLogger().setLevel(logging.INFO)
    from d2vlm_jax.config import ConfigError
    from d2vlm_jax.train import loop
    print(f"d2vlm-jax: {jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}), workdir {_WORKDIR.value}", flush=True)
    try:
        loop.run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, loop.TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
