#!/usr/bin/env bash
# Creates the TPU VM slice as a queued resource (waits for capacity; SPOT=1 for spot VMs).
#   BUCKET=gs://my-bucket bash launch/tpu/create.sh
#   ACCELERATOR=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite ZONE=us-west4-a TPU_NAME=d2vlm-v5e BUCKET=... bash launch/tpu/create.sh
source "$(dirname "$0")/env.sh"
spot=()
if [[ "${SPOT:-0}" == "1" ]]; then spot=(--spot); fi
gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --node-id "${TPU_NAME}" \
  --project "${PROJECT}" --zone "${ZONE}" --accelerator-type "${ACCELERATOR}" \
  --runtime-version "${RUNTIME}" "${spot[@]}"
echo "waiting for ${TPU_NAME} (${ACCELERATOR}) to become ACTIVE ..."
until [[ "$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --zone "${ZONE}" \
          --project "${PROJECT}" --format='value(state.state)')" == "ACTIVE" ]]; do sleep 30; done
gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
  --format='value(state,acceleratorType,networkEndpoints.len())'
