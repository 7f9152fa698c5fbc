#!/usr/bin/env bash
# After a preemption: recreate the slice if it is gone, reinstall, and run the same command;
# train.py restores the newest complete checkpoint (state + every worker's data-iterator
# position) from ${WORKDIR} and continues. Same arguments as train.sh.
source "$(dirname "$0")/env.sh"
here="$(dirname "$0")"
state="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone "${ZONE}" --project "${PROJECT}" \
          --format='value(state)' 2>/dev/null || echo MISSING)"
if [[ "${state}" != "READY" ]]; then
  echo "slice ${TPU_NAME} is ${state}: recreating it"
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --zone "${ZONE}" --project "${PROJECT}" \
    --force --quiet || true
  bash "${here}/create.sh"
  bash "${here}/setup.sh"
fi
bash "${here}/train.sh" "$@"
