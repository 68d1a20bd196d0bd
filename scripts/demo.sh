#!/usr/bin/env bash
# Run the whole pipeline on the embedded demo corpus (sets everything up first on a fresh machine).
#   scripts/demo.sh            # outputs under ./data (or $MLLM_STORAGE_ROOT)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

dagster job execute -m mllm_pipeline.definitions -j demo_pipeline "$@"
python -m mllm_pipeline.demo.summary
