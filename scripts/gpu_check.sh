#!/usr/bin/env bash
# The GPU check (docs/gpu.md): the `gpu`-marked tests and bench/bench_gpu.py on a CUDA machine
# that has only a recent PyTorch stack and no network. What else they import travels in
# .gpu-bundle/ (`make gpu-bundle`, ~35 MiB of wheels); the models are random, built from configs.
# Writes gpu_tests.txt, gpu_bench.txt, gpu.json and gpu.md into $OUT (default bench/out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
ls "$BUNDLE"/*.whl > /dev/null || { echo "no wheels in $BUNDLE: run 'make gpu-bundle' first" >&2; exit 2; }
SITE=$(mktemp -d)
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$BUNDLE"/*.whl
export PYTHONPATH="$PWD/src:$PWD:$SITE"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_machine.txt" || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu_machine.txt"
status=0
timeout 330 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
timeout 210 "$PY" bench/bench_gpu.py 2>&1 | tee "$OUT/gpu_bench.txt" || status=1
cp bench/out/gpu.json bench/out/gpu.md "$OUT"/ 2>/dev/null || true
exit $status
