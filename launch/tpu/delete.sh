#!/usr/bin/env bash
# Deletes the slice (the bucket with checkpoints and logs stays).
source "$(dirname "$0")/env.sh"
gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --zone "${ZONE}" --project "${PROJECT}" --force --quiet
