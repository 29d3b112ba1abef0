#!/usr/bin/env bash
# Every GPU check of kquant in one run, ending with one summary table.
#
#   tools/gpu_check.sh          # on a machine with an NVIDIA GPU; falls back to --sim without one
#   tools/gpu_check.sh --sim    # Numba's CUDA simulator on the CPU, even where a GPU is present
#
# Needs, from the repository root: pip install -e ".[gpu,dev]" (CuPy for CUDA 12, numba-cuda
# with its CUDA 12 NVVM/runtime wheels, pytest), an NVIDIA driver and nvidia-smi. Without a
# GPU only the dev extra is needed: the simulator mode uses numba alone.
#
# With a GPU (each step capped by `timeout`: 250 + 130 + 90 s, under 8 minutes in all; a step
# that runs out is a TIMEOUT row; the caps are estimates, never measured on a GPU):
#   1. pytest -m gpu: the tests that need a real GPU (kernels on large shapes; --device cuda
#      against --device cpu: logits, perplexity, imatrix), skipped in ordinary runs;
#   2. tools/bench_matvec_cuda.py: matvec GB/s per type against the device-to-device copy
#      bandwidth, and the tiled kernel's TFLOP/s;
#   3. tools/bench_runtime_devices.py: perplexity and imatrix tokens/s, --device cuda against
#      --device cpu, on data/tiny-llama (F32 and Q4_K_M).
# Without one (or with --sim), the same code on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1),
# whose timings mean nothing: the simulator tests of the kernels and of the runtime, the matvec
# benchmark on tiny shapes, and the runtime benchmark on the CPU only.
# Exit status: 0 when every step passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

mode=gpu
case "${1:-}" in
  --sim) mode=sim ;;
  "") ;;
  *) echo "usage: $0 [--sim]" >&2; exit 2 ;;
esac

gpu_present() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    "$PY" -c "import cupy, numba.cuda as c; assert cupy.cuda.runtime.getDeviceCount() > 0 and c.is_available()" \
      >/dev/null 2>&1
}

if [[ $mode == gpu ]] && ! gpu_present; then
  echo "gpu_check: no usable NVIDIA GPU (nvidia-smi, CuPy and numba.cuda must all see one):"
  echo "gpu_check: running the simulator checks on the CPU instead (timings meaningless)"
  mode=sim
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rows="$work/rows.tsv"     # check <TAB> result <TAB> detail: one per step, then its benchmark's
extra="$work/extra.tsv"   # the rows a benchmark writes (--tsv), moved under its step's row
: >"$rows"
failed=0
n_step=0

# step NAME TIMEOUT_S COMMAND...: runs it with its output shown and logged, records its row
step() {
  local name=$1 limit=$2; shift 2
  local log="$work/step$((n_step += 1)).log" t0=$SECONDS rc summary result=ok
  : >"$extra"
  echo "=== $name (at most ${limit} s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 124 || $rc == 137 ]]; then result="TIMEOUT"; failed=1
  elif [[ $rc != 0 ]]; then result="FAIL (exit $rc)"; failed=1; fi
  # pytest's last line ("12 passed, 3 skipped in 80.1s") says what ran
  summary=$(grep -E "[0-9]+ (passed|failed|error)|no tests ran" "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  printf '%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - t0)) s${summary:+; $summary}" >>"$rows"
  cat "$extra" >>"$rows"
}

if [[ $mode == gpu ]]; then
  device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
  step "pytest -m gpu" 250 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
  step "bench_matvec_cuda" 130 "$PY" tools/bench_matvec_cuda.py --repeats 20 --tsv "$extra"
  step "bench_runtime_devices" 90 "$PY" tools/bench_runtime_devices.py --chunks 8 --tsv "$extra"
else
  device="none: Numba CUDA simulator on the CPU ($(nproc) cores), timings meaningless"
  export NUMBA_ENABLE_CUDASIM=1
  step "pytest simulator: runtime" 300 "$PY" -m pytest -q -p no:cacheprovider -k test_sim_ \
    tests/test_runtime_cuda.py
  # the kernels' own simulator tests, the types the runtime test's model does not use
  step "pytest simulator: kernels" 600 "$PY" -m pytest -q -p no:cacheprovider -k test_sim_ \
    tests/test_matmul_cuda.py
  step "bench_matvec_cuda --small" 300 "$PY" tools/bench_matvec_cuda.py --small --types Q4_K Q8_0 \
    --tsv "$extra"
  unset NUMBA_ENABLE_CUDASIM
  step "bench_runtime_devices (cpu)" 300 "$PY" tools/bench_runtime_devices.py --devices cpu --chunks 2 \
    --tsv "$extra"
fi

echo
echo "## kquant GPU check: mode $mode; device: $device"
echo
echo "| check | result | detail |"
echo "|---|---|---|"
while IFS=$'\t' read -r name result detail; do
  echo "| $name | $result | $detail |"
done <"$rows"
exit $failed
