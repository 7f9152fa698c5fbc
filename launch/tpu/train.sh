#!/usr/bin/env bash
# Runs the same training command on every worker (jax.distributed.initialize() detects the
# pod: --multihost). Checkpoints, metrics and logs go to the shared ${WORKDIR} (the bucket,
# mounted on every worker); running it again after a preemption resumes from the newest
# checkpoint. Extra arguments are passed to launch/train.py, e.g.
#   BUCKET=gs://b RUN=sft1 bash launch/tpu/train.sh --config.init_checkpoint=/gcs/b/etchat/params
# Each worker's output: ${WORKDIR}/logs/worker_<hostname>.log (and the console of worker 0).
# A failing train.py fails the ssh (pipefail: the tee to the log does not hide its exit code).
source "$(dirname "$0")/env.sh"
args="$(printf ' %q' "$@")"   # quoted for the remote shell (overrides may hold spaces, parentheses)
tpu_ssh "set -eo pipefail; cd ~/${REPO_DIR}; mkdir -p ${WORKDIR}/logs
  export TPU_LOG_DIR=/tmp/tpu_logs
  .venv/bin/python launch/train.py --multihost --config ${CONFIG} --workdir ${WORKDIR} \
    --config.data.train_annotations=${DATA_LOCAL}/train.json \
    --config.data.eval_annotations=${DATA_LOCAL}/val.json \
    --config.data.llm_tokenizer=${DATA_LOCAL}/tokenizer.json \
    --config.data.qformer_vocab=${DATA_LOCAL}/vocab.txt \
    ${args} 2>&1 | tee ${WORKDIR}/logs/worker_\$(hostname).log"
