#!/usr/bin/env bash
# The whole check for a machine with one CUDA GPU, in one go (sized for 8 minutes on one H100
# or H200 with 16 cores): the CUDA tests, then every benchmark at the h100 preset, data included.
#
#   bash benchmarks/gpu_check.sh                 # logs and tables under build/gpu-check
#   OUT=/somewhere bash benchmarks/gpu_check.sh  # or under $OUT
#
# Tables go to $OUT/RESULTS.md (append them to benchmarks/RESULTS.md once read), logs to
# $OUT/*.log; the exit status is the tests' if they failed, else the benchmarks'.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
PY=${PYTHON:-python}
DATA=${BENCH_DATA:-/tmp/fc7cache-bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; nproc; $PY -c 'import torch, torchvision; print(torch.__version__,
  torchvision.__version__, torch.cuda.get_device_name(0))'; } > "$OUT/machine.txt" 2>&1
started=$(date +%s)
timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log"
tests=${PIPESTATUS[0]}
echo "cuda tests: exit $tests in $(( $(date +%s) - started )) s" | tee -a "$OUT/pytest-cuda.log"
BENCHMARK_RESULTS="$OUT/RESULTS.md" timeout 440 $PY -m benchmarks.all --preset h100 \
  --data "$DATA/tiny" 2>&1 | tee "$OUT/benchmarks.log"
benchmarks=${PIPESTATUS[0]}
echo "benchmarks: exit $benchmarks; all done in $(( $(date +%s) - started )) s" \
  | tee -a "$OUT/benchmarks.log"
[ "$tests" -ne 0 ] && exit "$tests"
exit "$benchmarks"
