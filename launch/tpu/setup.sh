#!/usr/bin/env bash
# Installs the project on EVERY worker of the slice, mounts the bucket (checkpoints, logs) with
# Cloud Storage FUSE, and copies the dataset (annotations + videos + tokenizers) to local disk.
#   BUCKET=gs://my-bucket DATA=gs://my-bucket/data/etinstruct bash launch/tpu/setup.sh
# The data pipeline reads local paths only (os/open + PyAV): it cannot read gs:// URLs, so the
# data is copied to ${DATA_LOCAL} on every worker (each worker reads only its shard of it).
source "$(dirname "$0")/env.sh"
: "${DATA:?set DATA=gs://<bucket>/<dataset dir> (annotations, videos/, tokenizer files)}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
# 1. the code, identical on every worker (tracked files of this checkout)
tarball="$(mktemp -d)/d2vlm-jax.tar.gz"
git -C "${root}" archive --format=tar.gz -o "${tarball}" HEAD
gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:~/d2vlm-jax.tar.gz" --zone "${ZONE}" \
  --project "${PROJECT}" --worker=all
# 2. venv + project + the tpu extra; gcsfuse; the data copy
tpu_ssh "set -e
  mkdir -p ~/${REPO_DIR} && tar -xzf ~/d2vlm-jax.tar.gz -C ~/${REPO_DIR}
  sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv ffmpeg >/dev/null
  if ! command -v gcsfuse >/dev/null; then
    export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
    echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
  fi
  cd ~/${REPO_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'
  sudo mkdir -p ${MOUNT}/${BUCKET_NAME} && sudo chown \$USER ${MOUNT}/${BUCKET_NAME}
  mountpoint -q ${MOUNT}/${BUCKET_NAME} || gcsfuse --implicit-dirs --rename-dir-limit=1000000 ${BUCKET_NAME} ${MOUNT}/${BUCKET_NAME}
  sudo mkdir -p ${DATA_LOCAL} && sudo chown \$USER ${DATA_LOCAL}
  gcloud storage rsync --recursive ${DATA} ${DATA_LOCAL}
  ~/${REPO_DIR}/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
