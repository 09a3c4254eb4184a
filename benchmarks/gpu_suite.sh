#!/usr/bin/env bash
# The GPU session in one command: the kernel test suite on CUDA, then the decode-step benchmarks
# (bench_gpu, bench_back_to_back, bench_sessions), the backends' comparison (bench_backends)
# and the cost of a new process's first steps (bench_cold_start).
#
#   OUT=results-dir CAPTURE=real_l20_64k.pt bash benchmarks/gpu_suite.sh [tests|bench|all|shapes]
#
# shapes (not part of all): the launch shapes of the filter and the sparse attention inside the
# captured step (bench_launch_shapes), what the launchers' defaults were chosen by.
#
# Runs from a source tree without installing the package (only torch, triton, pytest and
# hypothesis are needed): louver_kernels is made importable through a symlink to kernels/.
# Logs and JSON go to $OUT (default benchmarks/results/gpu). CAPTURE is a file made by
# benchmarks/bench_gpu.py --make-capture (real q/k/v of one layer); the real-key tests also use
# data/captures/test_smollm2_1k.pt when it exists. TESTS overrides the test paths.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-benchmarks/results/gpu}
CAPTURE=${CAPTURE:-.carry/real_l20_64k.pt}
mkdir -p "$OUT"
pk=$(mktemp -d)
ln -sfn "$PWD/kernels" "$pk/louver_kernels"
export PYTHONPATH="$pk:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    | tee -a "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/kernels} 2>&1 \
        | tee "$OUT/pytest_kernels.log"
    rc=${PIPESTATUS[0]}
fi
if [[ $what == bench || $what == all ]]; then
    python3 -m benchmarks.bench_gpu --capture "$CAPTURE" --out "$OUT/bench_gpu.json" \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
    rc=$(( rc | PIPESTATUS[0] ))
    python3 -m benchmarks.bench_back_to_back --capture "$CAPTURE" \
        --out "$OUT/bench_back_to_back.json" 2>&1 | tee "$OUT/bench_back_to_back.log"
    rc=$(( rc | PIPESTATUS[0] ))
    python3 -m benchmarks.bench_sessions --capture "$CAPTURE" \
        --out "$OUT/bench_sessions.json" 2>&1 | tee "$OUT/bench_sessions.log"
    rc=$(( rc | PIPESTATUS[0] ))
    python3 -m benchmarks.bench_backends --capture "$CAPTURE" \
        --out "$OUT/bench_backends.json" 2>&1 | tee "$OUT/bench_backends.log"
    rc=$(( rc | PIPESTATUS[0] ))
    python3 -m benchmarks.bench_cold_start --out "$OUT/bench_cold_start.json" 2>&1 \
        | tee "$OUT/bench_cold_start.log"
    rc=$(( rc | PIPESTATUS[0] ))
fi
if [[ $what == shapes ]]; then
    python3 -m benchmarks.bench_launch_shapes --capture "$CAPTURE" \
        --out "$OUT/bench_launch_shapes.json" 2>&1 | tee "$OUT/bench_launch_shapes.log"
    rc=${PIPESTATUS[0]}
fi
exit $rc
