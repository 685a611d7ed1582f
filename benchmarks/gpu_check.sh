#!/usr/bin/env bash
# One-shot GPU check for a session that has a CUDA device: about 10 minutes on an H100/H200.
#
#   1. the Triton kernel tests on the GPU (real kernels, not the interpreter), slow ones and the
#      wave regime's skipped; then the wave regime's tests alone, under a short limit (its
#      programs wait on each other: a synchronization bug would hang, not fail);
#   2. groupnorm bench over every docs/spec.md shape, NCHW and channels-last, fwd and fwd+bwd
#      (providers: ours, torch, cuDNN BatchNorm; torch.compile's figures are in docs/spec.md and its
#      compiles would not fit the budget), JSON under benchmarks/results/ named with the device;
#      then, if its tests passed, the wave regime alone (provider ours-wave);
#   3. the performance MODEL (benchmarks/model.py) beside each measurement, >20 % gaps flagged.
#
# Usage: benchmarks/gpu_check.sh  (env: PYTHON, REPS=20, TEST_TIMEOUT=170, WAVE_TIMEOUT=70,
# BENCH_TIMEOUT=240, WAVE_BENCH_TIMEOUT=90)
# Each step has its own time limit so that a hang in one still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
OUT=benchmarks/results
mkdir -p "$OUT"
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; nothing to check" >&2
    exit 2
fi
"$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

echo "== 1/3 CUDA correctness: tests/test_triton.py"
timeout "${TEST_TIMEOUT:-170}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    -k "not wave" tests/test_triton.py || status=1
echo "== 1/3 the wave regime's tests (a hang here is a synchronization bug)"
wave_ok=1
timeout "${WAVE_TIMEOUT:-70}" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    -k wave tests/test_triton.py || { status=1; wave_ok=0; }

echo "== 2/3 groupnorm bench: every spec shape, both layouts, fwd and fwd+bwd"
before=$(ls "$OUT"/bench-*.json 2>/dev/null | sort)
timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/bench.py --reps "${REPS:-20}" \
    --providers ours,torch,cudnn-batchnorm --out "$OUT" || status=1
after=$(ls "$OUT"/bench-*.json 2>/dev/null | sort)
new=$(comm -13 <(echo "$before") <(echo "$after") | tail -1)
if [ "$wave_ok" = 1 ]; then
    echo "== 2/3 the wave regime (opt-in), every spec shape, both layouts, fwd and fwd+bwd"
    timeout "${WAVE_BENCH_TIMEOUT:-90}" "$PY" benchmarks/bench.py --reps "${REPS:-20}" \
        --providers ours-wave --out "$OUT" || status=1
fi

echo "== 3/3 the MODEL beside the measurements"
device=h100
case "$("$PY" -c "import torch; print(torch.cuda.get_device_name())")" in
    *H200*) device=h200 ;;
esac
if [ -n "$new" ]; then
    "$PY" benchmarks/model.py --device "$device" --compare "$new" || status=1
else
    echo "no new bench JSON in $OUT: the model has nothing to stand beside" >&2
    status=1
fi
exit $status
