#!/usr/bin/env bash
# Before renting the slice: does the plan fit? (runs locally, needs the tpu extra)
#   bash launch/tpu/compile_check.sh configs/d2vlm_phi3_v5p.py v5p:2x2x1 [sft|fpo]
set -euo pipefail
config="${1:-configs/d2vlm_phi3_v5p.py}"; topology="${2:-v5p:2x2x1}"; stage="${3:-sft}"
variant=""; [[ "${stage}" == "fpo" ]] && variant=":fpo"
cd "$(dirname "$0")/../.."
ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_LOG_DIR="${TPU_LOG_DIR:-/tmp/tpu_logs}" JAX_PLATFORMS=cpu \
  python launch/compile_check.py --config "${config}${variant}" --topology "${topology}" --stage "${stage}"
