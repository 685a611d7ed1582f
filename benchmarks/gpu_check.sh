#!/usr/bin/env bash
# One-shot GPU check for a session that has a CUDA device: at most about 9 minutes on an H200.
#
#   1. the Triton kernel tests on the GPU (real kernels, not the interpreter), spread over
#      pytest-xdist workers; the wave regime's and the compile-only ones (sm_90 code read on the
#      CPU, already run in CI) left out. At the same time, processes that run ours once on every
#      spec shape (its correctness check, forward and backward) so that Triton's disk cache holds
#      every kernel the bench launches and step 3 compiles nothing while it times;
#   2. the wave regime's tests alone, under a short limit (its programs wait on each other: a
#      synchronization bug would hang, not fail);
#   3. groupnorm bench over every docs/spec.md shape, NCHW and channels-last, fwd and fwd+bwd
#      (providers: ours, torch, cuDNN BatchNorm; torch.compile's figures are in docs/spec.md and
#      its compiles would not fit the budget), JSON under $RESULTS named with the device, saved
#      after every row; then, if its tests passed, the wave regime alone (provider ours-wave);
#   4. eager calls (benchmarks/eager_gpu.py): ours and nn.GroupNorm on small shapes without a
#      graph, where the host time (our Python, Triton's launcher) sets a call's time;
#   5. the performance MODEL (benchmarks/model.py) beside each measurement, >20 % gaps flagged.
#
# Usage: benchmarks/gpu_check.sh  (env: PYTHON, RESULTS=benchmarks/results, LOGS=$RESULTS,
# WORKERS=8, REPS=20, TEST_TIMEOUT=170, WAVE_TIMEOUT=75, BENCH_TIMEOUT=160, WAVE_BENCH_TIMEOUT=70,
# EAGER_TIMEOUT=90)
# Each step has its own time limit so that a hang in one still leaves the others' output; every
# step's output goes to the terminal and to a log under $LOGS.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
RESULTS=${RESULTS:-benchmarks/results}
LOGS=${LOGS:-$RESULTS}
WORKERS=${WORKERS:-8}
mkdir -p "$RESULTS" "$LOGS"
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; nothing to check" >&2
    exit 2
fi
"$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"

# The project's warning filters turn warnings into errors; here a deprecation in the GPU
# machine's torch or triton must not hide the kernels' results, so pytest only shows them.
tests() { timeout -k 10 "$1" "$PY" -m pytest -q -p no:cacheprovider -W default "${@:2}"; }

echo "== 1/5 CUDA correctness: tests/test_triton.py on $WORKERS workers; kernels compiled for the bench"
for i in $(seq 0 $((WORKERS - 1))); do
    timeout -k 10 "${TEST_TIMEOUT:-170}" "$PY" benchmarks/bench.py --warm "$i/$WORKERS" \
        >>"$LOGS/warm.log" 2>&1 &
done
tests "${TEST_TIMEOUT:-170}" -n "$WORKERS" -k "not wave and not compile_for_sm90 and not spills" \
    tests/test_triton.py 2>&1 | tee "$LOGS/tests.log" || status=1
wait
grep "failed" "$LOGS/warm.log" && status=1

echo "== 2/5 the wave regime's tests (a hang here is a synchronization bug)"
wave_ok=1
tests "${WAVE_TIMEOUT:-75}" -n "$WORKERS" -k wave tests/test_triton.py 2>&1 \
    | tee "$LOGS/wave-tests.log"
rc=$?
[ $rc = 124 ] && echo "gpu_check: the wave tests ran past ${WAVE_TIMEOUT:-75} s (a hang?)"
[ $rc = 0 ] || { status=1; wave_ok=0; }

echo "== 3/5 groupnorm bench: every spec shape, both layouts, fwd and fwd+bwd"
before=$(ls "$RESULTS"/bench-*.json 2>/dev/null | sort)
timeout -k 10 "${BENCH_TIMEOUT:-160}" "$PY" benchmarks/bench.py --reps "${REPS:-20}" \
    --providers ours,torch,cudnn-batchnorm --out "$RESULTS" 2>&1 | tee "$LOGS/bench.log" \
    || status=1
after=$(ls "$RESULTS"/bench-*.json 2>/dev/null | sort)
new=$(comm -13 <(echo "$before") <(echo "$after") | head -1)
if [ "$wave_ok" = 1 ]; then
    echo "== 3/5 the wave regime (opt-in), every spec shape, both layouts, fwd and fwd+bwd"
    timeout -k 10 "${WAVE_BENCH_TIMEOUT:-70}" "$PY" benchmarks/bench.py --reps "${REPS:-20}" \
        --providers ours-wave --out "$RESULTS" 2>&1 | tee "$LOGS/bench-wave.log" || status=1
fi

echo "== 4/5 eager calls on small shapes: host time, Triton's launcher included"
timeout -k 10 "${EAGER_TIMEOUT:-90}" "$PY" benchmarks/eager_gpu.py --out "$RESULTS" 2>&1 \
    | tee "$LOGS/eager.log" || status=1

echo "== 5/5 the MODEL beside the measurements"
device=h100
case "$("$PY" -c "import torch; print(torch.cuda.get_device_name())")" in
    *H200*) device=h200 ;;
esac
if [ -n "$new" ]; then
    "$PY" benchmarks/model.py --device "$device" --compare "$new" >"$LOGS/model.log" 2>&1 \
        || status=1
    grep -A200 "MODEL vs MEASURED" "$LOGS/model.log"
else
    echo "no new bench JSON in $RESULTS: the model has nothing to stand beside" >&2
    status=1
fi
exit $status
