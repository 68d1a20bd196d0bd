#!/usr/bin/env bash
# Run the test suite (sets everything up first on a fresh machine). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# servers the deployment tests start on loopback: PostgreSQL (the instance's storage) and Chromium (the web UI)
apt_install postgresql chromium

python -m pytest "$@"
