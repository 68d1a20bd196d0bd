#!/usr/bin/env bash
# One GPU check of the training path, in at most ~8 minutes on one H100 / H200:
#   1. the model and training tests on the GPU machine (the loop picks CUDA: mixed precision, fused AdamW);
#   2. the HD transform: the batched GPU path (hd_torch) against the CPU path, images/s;
#   3. the real-shape step: CLIP ViT-L/14-336 + a 1B Llama-shape LLM from config (random weights), bf16 mixed
#      precision, HD-9 images, the batch packed into one row; prints tokens/s, MFU and peak memory;
#   4. the training loader: DataLoader workers (uint8, pinned, HD on the GPU) against the thread loader, samples/s.
# Without CUDA (or with GPU_CHECK_REDUCED=1) every stage runs in a reduced CPU mode (tiny model, few images),
# so the script itself is checked end to end anywhere. Figures go to ${OUT:-gpu_check_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if [[ "${GPU_CHECK_REDUCED:-}" == "1" ]] || ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  REDUCED=1
else
  REDUCED=0
fi
echo "== gpu_check (reduced=$REDUCED)"
if [[ $REDUCED == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  echo "== 1/4 tests"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider mllm_pipeline_tests/model mllm_pipeline_tests/train -x \
    -k "not ddp and not fsdp2" 2>&1 | tail -5
  echo "== 2/4 HD transform: GPU vs CPU"
  timeout 120 "$PY" bench/hd_bench.py --images 64 --hd-num 9 --repeats 1 --device cuda --wait-idle 0 --json "$OUT/hd.json" | tail -20
  echo "== 3/4 real-shape step (ViT-L/14-336 + 1B Llama shape, HD-9, packed, bf16)"
  timeout 180 "$PY" bench/train_bench.py --device cuda --size real --hd-num 9 --batch 8 --packed \
    --precision mixed --steps 10 --warmup 3 --json "$OUT/train.json"
  echo "== 4/4 training loader: workers (uint8 -> GPU HD) vs thread"
  timeout 120 "$PY" bench/loader_bench.py --device cuda --workers 8 --tars 8 --per-tar 32 --repeat 1 \
    --json "$OUT/loader.json" | tail -25
else
  echo "== 1/4 tests (reduced: the packing and conversion tests)"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider mllm_pipeline_tests/model/test_packing.py \
    mllm_pipeline_tests/model/test_convert.py 2>&1 | tail -3
  echo "== 2/4 HD transform (reduced: CPU only, 8 images)"
  timeout 120 "$PY" bench/hd_bench.py --images 8 --hd-num 4 --repeats 1 --threads 1 --wait-idle 0 --json "$OUT/hd.json" | tail -8
  echo "== 3/4 training step (reduced: tiny model on the CPU, packed)"
  timeout 180 "$PY" bench/train_bench.py --device cpu --size tiny --hd-num 4 --batch 4 --packed --steps 2 \
    --warmup 1 --threads 1 --json "$OUT/train.json"
  echo "== 4/4 training loader (reduced: 2 tars of 4 images, hd_num 1)"
  timeout 120 "$PY" bench/loader_bench.py --tars 2 --per-tar 4 --hd-num 1 --repeat 1 --json "$OUT/loader.json" | tail -25
fi
echo "== done: figures in $OUT/"
