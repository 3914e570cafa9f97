#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU tests and the benchmarks, print a short table last.
# Usage (device machine, repo root): bash benchmarks/gpu_check.sh [tests|bench|all|dual] [bench names...]
#   tests  the GPU tests (kernels first, in their own run, then the layers; TEST_PARTS='a b;c' picks other runs)
#   bench  the named benchmarks (default: all four), one after the other
#   all    tests, then benchmarks
#   dual   (2 GPUs) the 340M recipe's 1-GPU, TP2 and CP2 training runs (benchmarks/scale_run.sh) on both, then the
#          tests on GPU 1 alongside the benchmarks on GPU 0 (TEST_GPUS=0,1 with no benchmark: the tests' xdist
#          workers spread over both)
# A device call is limited to 10 minutes; fla's first calls autotune for minutes (fla_cache.py saves and reuses
# its choices: FLA_DUMP_DIR, packed into $OUT/fla_configs.tgz, and FLA_CONFIG_DIR). TEST_TIMEOUT / BENCH_TIMEOUT /
# SCALE_BUDGET (seconds) bound each of the two test runs, each benchmark (TIMEOUT_<name> for one) and the training
# runs; TEST_WORKERS pytest-xdist processes share the GPU (Triton compiles on the CPU cores). Details land in $OUT.
# A run past its bound gets SIGTERM, then SIGKILL 10 s later: fla's autotuning processes ran about 240 s past a plain
# `timeout`. With 8 workers on one H100, the kernels' 28 GPU tests took more than 175 s, those of mixers and generation
# (22) more than 186 s.
set -uo pipefail
WHAT=${1:-all}
shift || true
BENCHES=${*:-bench_mom bench_delta_rule bench_decode bench_gla}
OUT=${OUT:-/tmp/gpu_check_out}
# $OUT keeps the logs (a device call brings back only a few files); JSON rows and run folders go to WORK
WORK=/tmp/gpu_check_work
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$SITE
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
  || { echo "package install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$WORK/gpu.txt"
REPO=$PWD

run_tests() {
  # From a scratch dir, so the installed package (with the mapped linear_moe.mixers / .kernels) is the one imported.
  # Kernels first, in their own run (their report survives a time-out of the layer tests), then the layers.
  local rc_all=0 part p rc parts
  IFS=';' read -ra parts <<<"${TEST_PARTS:-kernels;mixers/test_mom.py generation mixers/test_linear_mixers.py parallel}"
  for part in "${parts[@]}"; do
    local paths=()
    for p in $part; do paths+=("$REPO/tests/$p"); done
    (cd /tmp && PYTEST_FAILURE_LOG="$OUT/gpu_failures.log" timeout -k 10 "${TEST_TIMEOUT:-270}" python3 -m pytest -v -rfE --tb=short -m gpu -p no:cacheprovider \
      -n "${TEST_WORKERS:-4}" \
      --rootdir "$REPO" "${paths[@]}") >>"$OUT/gpu_tests.log" 2>&1
    rc=$?
    [[ $rc == 0 ]] || rc_all=$rc
  done
  echo "$rc_all" >"$WORK/gpu_tests.rc"
}

run_benches() {
  local b limit
  for b in $BENCHES; do
    limit=TIMEOUT_$b  # e.g. TIMEOUT_bench_mom=120 overrides BENCH_TIMEOUT for one benchmark
    [[ -f $REPO/benchmarks/$b.py ]] && (cd /tmp && OUT=$WORK timeout -k 10 "${!limit:-${BENCH_TIMEOUT:-420}}" \
      python3 "$REPO/benchmarks/$b.py") >"$OUT/$b.log" 2>&1
  done
}

case $WHAT in
  tests) run_tests ;;
  bench) run_benches ;;
  all) run_tests; run_benches ;;
  dual)
    # the two-GPU runs first (bounded by SCALE_BUDGET), then the one-GPU work side by side in the time left
    BUDGET=${SCALE_BUDGET:-240} STEPS=${STEPS:-20} GBS=${GBS:-16} MBS=${MBS:-4} \
      bash "$REPO/benchmarks/scale_run.sh" 340m --out "$WORK/scale" >"$OUT/scale_run.log" 2>&1
    cp "$WORK/scale/scale_run.json" "$WORK/scale/loss_curves.png" "$OUT/" 2>/dev/null
    CUDA_VISIBLE_DEVICES=${TEST_GPUS:-1} run_tests &
    CUDA_VISIBLE_DEVICES=0 run_benches
    wait ;;
  *) echo "unknown mode '$WHAT': tests, bench, all or dual"; exit 2 ;;
esac
# fla's configs dumped by this call come back as one archive (a call returns a limited number of files; one file per
# kernel did not all come back); unpack it into the FLA_CONFIG_DIR of a later call
[[ -n ${FLA_DUMP_DIR:-} && -d $FLA_DUMP_DIR ]] && tar czf "$OUT/fla_configs.tgz" -C "$FLA_DUMP_DIR" .

echo
echo "== summary"
cat "$WORK/gpu.txt"
if [[ -f $OUT/gpu_tests.log ]]; then
  echo "gpu tests rc=$(cat "$WORK/gpu_tests.rc" 2>/dev/null || echo timeout):"
  grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed)" "$OUT/gpu_tests.log"
  [[ -f $OUT/gpu_failures.log ]] && grep -E "^(==|E  )" "$OUT/gpu_failures.log" | cut -c1-400 | head -n 40
fi
for b in $BENCHES; do
  [[ -f $OUT/$b.log ]] && { echo "-- $b"; grep -vE "Warning|warn" "$OUT/$b.log" | tail -n 16; }
done
[[ -f $OUT/scale_run.log ]] && { echo "-- scale_run"; tail -n 14 "$OUT/scale_run.log"; }
true
