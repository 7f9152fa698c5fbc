#!/usr/bin/env bash
# State of the slice (ACTIVE / PREEMPTED / ...) and the run's newest checkpoint.
source "$(dirname "$0")/env.sh"
gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --zone "${ZONE}" --project "${PROJECT}" \
  --format='value(state.state)' || true
gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
  --format='value(state,health)' || true
gcloud storage ls "${BUCKET}/runs/${RUN}/*/checkpoints/" 2>/dev/null | tail -n 3 || echo "no checkpoints yet"
