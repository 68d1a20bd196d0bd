#!/usr/bin/env bash
# Run the whole pipeline on the embedded demo corpus (sets everything up first on a fresh machine).
#   scripts/demo.sh            # outputs under ./data (or $MLLM_STORAGE_ROOT)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

python -m mllm_pipeline.demo.run "$@"
