#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine (idempotent; fast when nothing changed).
#   - Debian packages the pipeline shells out to (only when missing and when we may install them)
#   - a virtual environment in .venv with the project and its dev extras
# Other scripts source this file; run it directly to set up without doing anything else.
if [[ "${BASH_SOURCE[0]}" != "$0" && $- == *i* ]]; then
  # sourced from your interactive shell: install in a child bash (a failure there ends the child, not your
  # terminal), then set the environment here; your shell's options (set -e ...) stay as they were
  _mllm_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if bash "$_mllm_dir/scripts/setup.sh"; then
    cd "$_mllm_dir" || return 1
    export MLLM_VIDEO2DATASET_PYTHON="${MLLM_VIDEO2DATASET_PYTHON:-$_mllm_dir/${MLLM_VIDEO2DATASET_VENV:-.venv-video2dataset}/bin/python}"
    export PATH="$_mllm_dir/${MLLM_VENV:-.venv}/bin:$PATH"
    export DAGSTER_HOME="${DAGSTER_HOME:-$_mllm_dir/.dagster_home}"
  fi
  unset _mllm_dir
  return 0
fi
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${MLLM_VENV:-.venv}"

apt_install() {
  # apt_install PKG... : install Debian packages that are not there yet (needs root, or sudo without a password)
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# reinstall only when the dependency list changed
stamp="$VENV/.mllm_pipeline.installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing mllm_pipeline and its dependencies into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # PyTorch: a torch that is already there (a CUDA build, say) is kept; otherwise $MLLM_TORCH_SPEC is installed first
  # (default torch==2.13.0), so that the project's "torch>=2.4" is satisfied without pulling another build.
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "${MLLM_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  "$VENV/bin/python" -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import mllm_pipeline.definitions" >/dev/null
  echo "$want" > "$stamp"
fi

# video2dataset 1.3.0 pins torch==2.1.2, torchaudio, torchdata, transformers==4.37.1 and numpy<2, and breaks with
# pyarrow>=18: it gets its own environment, which the video assets launch through Dagster Pipes. The main
# environment (and the training stack in it) is never touched by these pins. pyspark is there for video2dataset's
# pyspark distributor (distributor: pyspark on the video assets).
V2D_VENV="${MLLM_VIDEO2DATASET_VENV:-.venv-video2dataset}"
# yt-dlp pinned with the yt-dlp-ejs it needs, and deno: current yt-dlp needs a JavaScript runtime and its challenge solver scripts for YouTube (the
# video assets check both before a YouTube shard starts).
V2D_REQS="video2dataset==1.3.0 pyarrow<18 pyspark>=3.5,<5 yt-dlp==2026.11.23 deno>=2.3.0 yt-dlp-ejs==0.8.0 dagster-pipes==$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("dagster-pipes"))')"
v2d_stamp="$V2D_VENV/.mllm_pipeline.installed"
if [ "${MLLM_SKIP_VIDEO2DATASET:-0}" != "1" ] && { [ ! -f "$v2d_stamp" ] || [ "$(cat "$v2d_stamp")" != "$V2D_REQS" ]; }; then
  echo "setup: creating $V2D_VENV for video2dataset (first run: about 4 minutes, 6 GB)"
  [ -x "$V2D_VENV/bin/python" ] || "$PYTHON" -m venv "$V2D_VENV"
  # shellcheck disable=SC2086
  "$V2D_VENV/bin/python" -m pip install -q $V2D_REQS 2>&1 | grep -v '^WARNING: Location' || true
  "$V2D_VENV/bin/python" -c "import video2dataset.main, dagster_pipes" >/dev/null
  echo "$V2D_REQS" > "$v2d_stamp"
fi
export MLLM_VIDEO2DATASET_PYTHON="${MLLM_VIDEO2DATASET_PYTHON:-$PWD/$V2D_VENV/bin/python}"
apt_install ffmpeg

export PATH="$PWD/$VENV/bin:$PATH"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || : > "$DAGSTER_HOME/dagster.yaml"
