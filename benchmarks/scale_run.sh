#!/usr/bin/env bash
# One-node scaling runs on GPUs through benchmarks/scale_run.py; its table is printed last, its files land in $OUT.
# Usage (repo root): bash benchmarks/scale_run.sh [1p3b|340m] [more scale_run.py arguments or key.path=value ...]
#   1p3b (default, issue #7): configs/mom_1p3b_moe.yaml on 8 GPUs at DP8, TP2xDP4, TP2xPP2xDP2 and CP2xDP4, sequence
#        16k, equal global batch, plus a one-GPU run at 1/8 of it (same sequences per GPU) for weak-scaling efficiency.
#   340m (issue #6): configs/mom_340m.yaml on 2 GPUs: one GPU, TP2 and CP2 at equal global batch.
# LAYOUTS, STEPS, SEQ, GBS, MBS, BUDGET (seconds for all layouts), LAYOUT_TIMEOUT and PYTHON override the defaults.
# When linear_moe or megatron.core is not importable, the wheels in .whl and this repo are installed into /tmp/site
# first (as benchmarks/gpu_check.sh does).
set -uo pipefail
RECIPE=${1:-1p3b}
shift || true
export OUT=${OUT:-/tmp/scale_run_out}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ! "$PYTHON" -c "import linear_moe.mixers, megatron.core" 2>/dev/null; then
  SITE=/tmp/site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$SITE
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    || { echo "package install failed"; exit 1; }
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || echo "no nvidia-smi"
LIMITS=(--timeout "${LAYOUT_TIMEOUT:-1800}")
[[ -n ${BUDGET:-} ]] && LIMITS+=(--budget "$BUDGET")
case $RECIPE in
  1p3b)
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/scale_run.py configs/mom_1p3b_moe.yaml --layouts ${LAYOUTS:-1 dp8 tp2dp4 tp2pp2dp2 cp2dp4} \
      --weak-scaling --steps "${STEPS:-300}" --seq-length "${SEQ:-16384}" --global-batch "${GBS:-32}" \
      --micro-batch "${MBS:-1}" "${LIMITS[@]}" "$@" ;;
  340m)
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/scale_run.py configs/mom_340m.yaml --layouts ${LAYOUTS:-1 tp2 cp2} \
      --steps "${STEPS:-200}" --seq-length "${SEQ:-2048}" --global-batch "${GBS:-64}" --micro-batch "${MBS:-8}" \
      "${LIMITS[@]}" "$@" ;;
  *)
    echo "unknown recipe '$RECIPE': use 1p3b or 340m"; exit 2 ;;
esac
