#!/usr/bin/env bash
# The GPU check, one command on a fresh GPU machine (torch, triton, nvcc there; no network):
#   bash benchmarks/gpu_check.sh
# 1. builds bandadv in place for this GPU's architecture and makes one call of the op, stopping
# there if it fails or hangs; 2. runs every `gpu`-marked test (CUDA and Triton kernels against the
# float64 reference, graph capture, determinism, torch.compile); 3. runs compute-sanitizer
# memcheck and racecheck on a small driver of the CUDA kernel; 4. runs the benchmark sweep.
# Writes benchmarks/results/gpu_check_<gpu>_<date>.json (copied to $OUT when set) and prints a
# short table last. Sized to finish in under 6 minutes on one H100.
#
# GPU_CHECK_DRY_RUN=1 runs every step on a machine without a GPU, on CPU tensors (`make
# gpu-check-dry-run` does, in CI, with the GPU machine's Python, torch and Triton): the build for
# sm_90, the smoke call, the collection of the gpu tests (they skip), the sanitizer driver
# without the sanitizer, a quick sweep, the results file (in a temporary folder). What it cannot
# find is left to the GPU: the kernels' behaviour on the device.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  GPU="dry-run on $(uname -m) CPU" CAP=90 DEVICE=cpu
  RESULTS=${GPU_CHECK_RESULTS:-$(mktemp -d)}
  SWEEP_ARGS="--quick --budget 0.02"
else
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  DEVICE=cuda
  RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
  SWEEP_ARGS="--budget 0.15"
fi
export BANDADV_CHECK_DEVICE=$DEVICE
TAG=$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '_')_$(date +%Y-%m-%d)
LOG=$RESULTS/gpu_check_${TAG}.log
mkdir -p "$RESULTS"
: > "$LOG"
step() { echo "== $1" | tee -a "$LOG"; }
status=()

step "build (sm_$CAP) on $GPU"
start=$(date +%s)
if BANDADV_CUDA_ARCHS=$CAP BANDADV_FORCE_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$LOG" 2>&1; then
  status+=("build=ok($(( $(date +%s) - start ))s)")
else
  status+=("build=FAILED"); tail -30 "$LOG"; exit 1
fi
$PY -c "import bandadv; print('compiled kernels:', sorted(bandadv.ops.COMPILED))" | tee -a "$LOG"

# One call first, under a short timeout: a kernel that hangs (the look-back waits on other
# blocks) or fails here would only burn the time limits of every step below.
step "smoke"
timeout 60 $PY - >>"$LOG" 2>&1 <<'PYEOF'
import os, torch, bandadv
rewards = (torch.rand(1 << 20, device=os.environ["BANDADV_CHECK_DEVICE"]) < 0.5).float()
out = bandadv.group_advantages(rewards, 16, backend="auto", return_index=True)
kept = int(out.num_kept)
assert torch.equal(out.kept_index[:kept], out.sample_mask.nonzero().flatten()), "kept_index is wrong"
print("smoke: ok,", kept, "kept")
PYEOF
code=$?
if [ $code != 0 ]; then
  status+=("smoke=FAILED($code)"); tail -20 "$LOG"
  echo "GPU check on $GPU: ${status[*]} (stopped: the kernel fails or hangs on one call)"
  [ -n "${OUT:-}" ] && cp "$LOG" "$OUT"/ 2>/dev/null
  exit 1
fi
status+=("smoke=ok")

step "gpu tests"
timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG" | tail -15
status+=("tests=$([ "${PIPESTATUS[0]}" = 0 ] && echo ok || echo FAILED)")

if [ "$DEVICE" = cpu ]; then
  step "sanitizer driver (no sanitizer: CPU tensors)"
  timeout 75 $PY benchmarks/sanitizer_driver.py >>"$LOG" 2>&1
  code=$?; status+=("driver=$([ $code = 0 ] && echo ok || echo "FAILED($code)")")
elif command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    timeout 75 compute-sanitizer --tool $tool --error-exitcode 7 $PY benchmarks/sanitizer_driver.py >>"$LOG" 2>&1
    code=$?; status+=("$tool=$([ $code = 0 ] && echo ok || echo "FAILED($code)")")
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|driver: ok" "$LOG" | tail -2
  done
else
  status+=("sanitizer=not-installed")
fi

step "benchmark sweep"
timeout 120 $PY benchmarks/sweep.py --device $DEVICE $SWEEP_ARGS --out "$RESULTS" 2>&1 | tee -a "$LOG" | tail -40
status+=("bench=$([ "${PIPESTATUS[0]}" = 0 ] && echo ok || echo FAILED)")

SUMMARY=$RESULTS/gpu_check_${TAG}.json
$PY - "$SUMMARY" "$GPU" "${status[@]}" <<'PYEOF'
import glob, json, os, sys
path, gpu, *status = sys.argv[1:]
bench = sorted(glob.glob(os.path.join(os.path.dirname(path), os.environ["BANDADV_CHECK_DEVICE"] + "_*.json")))
json.dump({"gpu": gpu, "status": status, "benchmark": json.load(open(bench[-1])) if bench else None}, open(path, "w"), indent=1)
PYEOF
[ -n "${OUT:-}" ] && cp "$SUMMARY" "$LOG" "$OUT"/ 2>/dev/null
echo; echo "GPU check on $GPU: ${status[*]}"; echo "results: $SUMMARY"
case "${status[*]}" in *FAILED*) exit 1 ;; esac
