#!/usr/bin/env bash
# Run the test suite (sets everything up first on a fresh machine). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

python -m pytest "$@"
