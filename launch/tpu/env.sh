# Shared settings of the launch/tpu/*.sh scripts. Override any of them in the environment:
#   TPU_NAME=d2vlm-v5p ZONE=us-east5-a ACCELERATOR=v5p-8 BUCKET=gs://my-bucket bash launch/tpu/create.sh
set -euo pipefail
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${TPU_NAME:=d2vlm-v5p}"
: "${ZONE:=us-east5-a}"                    # v5p: us-east5-a; v5e: us-west4-a, us-east1-d, ...
: "${ACCELERATOR:=v5p-8}"                  # v5p-8 (4 chips, 1 host) | v5litepod-16 (16 chips, 4 hosts)
: "${RUNTIME:=v2-alpha-tpuv5}"             # v5p: v2-alpha-tpuv5; v5e: v2-alpha-tpuv5-lite
: "${BUCKET:?set BUCKET=gs://<your-bucket> (checkpoints, logs, dataset copies)}"
: "${RUN:=d2vlm-sft}"                       # run name: ${BUCKET}/runs/${RUN}
: "${CONFIG:=configs/d2vlm_phi3_v5p.py}"
: "${REPO_DIR:=d2vlm-jax}"                 # checkout location on every worker (home directory)
: "${MOUNT:=/gcs}"                         # where the bucket is mounted (Cloud Storage FUSE) on workers
: "${DATA_LOCAL:=/mnt/disks/data}"         # local copy of annotations + videos on every worker
BUCKET_NAME="${BUCKET#gs://}"
BUCKET_NAME="${BUCKET_NAME%%/*}"
WORKDIR="${MOUNT}/${BUCKET_NAME}/runs/${RUN}"   # shared by all workers (Orbax multi-host checkpoints)

tpu_ssh() {  # tpu_ssh "<command>" : run on every worker of the slice
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" --worker=all \
    --command "$1"
}
