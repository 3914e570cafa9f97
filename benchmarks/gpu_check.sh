#!/usr/bin/env bash
# One device call: install the carried wheels, run every GPU test, run the benchmarks, print a short table last.
# Usage (device machine, repo root): bash benchmarks/gpu_check.sh [tests|bench|all] [bench names...]
# A device call is limited to 10 minutes: run `tests` and `bench` as two calls (fla's first calls autotune for
# minutes), or name the benchmarks to run, e.g. `bench bench_mom`. TEST_TIMEOUT / BENCH_TIMEOUT (seconds) bound each of
# the two test runs and each benchmark. Details land in $OUT.
set -uo pipefail
WHAT=${1:-all}
shift || true
BENCHES=${*:-bench_delta_rule bench_gla bench_mom bench_decode}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$SITE
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
  || { echo "package install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# Run from a scratch dir so the installed package (with the mapped linear_moe.mixers / .kernels) is the one imported.
REPO=$PWD
cd /tmp
rc_tests=skipped
if [[ $WHAT == all || $WHAT == tests ]]; then
  # kernels first, in their own run (their report survives a time-out of the layer tests), then the layers
  rc_tests=0
  for part in kernels "mixers generation parallel"; do
    paths=()
    for p in $part; do paths+=("$REPO/tests/$p"); done
    timeout "${TEST_TIMEOUT:-270}" python3 -m pytest -v -rfE --tb=short -m gpu -p no:cacheprovider --rootdir "$REPO" \
      "${paths[@]}" 2>&1 | tee -a "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
    rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || rc_tests=$rc
  done
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  # fla's first calls autotune for minutes: give each benchmark a generous limit
  for b in $BENCHES; do
    [[ -f $REPO/benchmarks/$b.py ]] && timeout "${BENCH_TIMEOUT:-420}" python3 "$REPO/benchmarks/$b.py" 2>&1 | tee "$OUT/$b.log"
  done
fi
echo
echo "== summary"
cat "$OUT/gpu.txt"
echo "gpu tests rc=$rc_tests: $(grep -E "^=+ .*(passed|failed)" "$OUT/gpu_tests.log" 2>/dev/null | tr '\n' ' ')"
for b in $BENCHES; do
  [[ -f $OUT/$b.log ]] && { echo "-- $b"; tail -n 20 "$OUT/$b.log"; }
done
