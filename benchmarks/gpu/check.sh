#!/usr/bin/env bash
# Every GPU check in one call, for a GPU machine without TensorFlow (CMake, ninja, pybind11,
# PyTorch with CUDA, pytest; no nvcc needed): builds a CUDA-only tfbn._core
# (-DTFBN_TF_OPS=OFF) with the kernels compiled by NVRTC 12.5, runs tests/gpu, then the
# benchmark. Results go to the folder given as $1, or $OUT, or ./gpu-results: env.txt,
# build.log, kernel_resources.tsv, tests.log (+ junit xml), bench.log, bench_gpu.json,
# sanitizer.log. Exit status: the first failing step's.
#   benchmarks/gpu/check.sh [OUT_DIR]          TFBN_BENCH_ARGS=--quick for a short bench
# NVRTC comes from the wheels in build/nvrtc-wheels (TFBN_NVRTC_WHEELS), fetched there with
#   pip download --no-deps -d build/nvrtc-wheels $(grep ^nvidia-cuda requirements.txt)
# on a machine with network (the GPU machine may have none: carry the folder along).
# TFBN_GPU_ARCHS picks the images (default: the release list, sm_60..sm_90 + compute_90);
# TFBN_SANITIZE=0 skips the compute-sanitizer pass over a few small tests (at most
# TFBN_SANITIZE_TIMEOUT seconds, default 150).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-${OUT:-$PWD/gpu-results}}" && cd "${1:-${OUT:-$PWD/gpu-results}}" && pwd)"
BUILD="${TFBN_GPU_BUILD_DIR:-$ROOT/build/gpu-check}"
PY="${PYTHON:-python3}"
status=0
WHEELS="${TFBN_NVRTC_WHEELS:-$ROOT/build/nvrtc-wheels}"
step() { echo "== $* ($(date +%T))" | tee -a "$OUT_DIR/steps.log"; }

step env
{
  nvidia-smi || true
  ls "$WHEELS" || true
  cmake --version | head -1
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true
  nproc
} > "$OUT_DIR/env.txt" 2>&1

step build
t0=$(date +%s)
# The wheels unpacked side by side give the nvidia/ package CMake looks for.
NVIDIA_ROOT="$BUILD/nvidia-wheels"
if ! { ls "$WHEELS"/nvidia_cuda_nvrtc_cu12-*.whl > /dev/null &&
       mkdir -p "$NVIDIA_ROOT" &&
       for w in "$WHEELS"/nvidia_cuda_*.whl; do "$PY" -m zipfile -e "$w" "$NVIDIA_ROOT" || exit 1; done &&
       cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DTFBN_TF_OPS=OFF -DTFBN_CUDA=ON -DTFBN_NVIDIA_ROOT="$NVIDIA_ROOT" \
         ${TFBN_GPU_ARCHS:+-DTFBN_CUDA_ARCHS="$TFBN_GPU_ARCHS"} \
         -DPython_EXECUTABLE="$(command -v "$PY")" \
         -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
       cmake --build "$BUILD" --parallel; } > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"
  echo "check.sh: build failed (see $OUT_DIR/build.log)"
  exit 1
fi
echo "build seconds: $(( $(date +%s) - t0 ))" | tee -a "$OUT_DIR/build.log"
cp "$BUILD/cuda/kernel_resources.tsv" "$OUT_DIR/" 2> /dev/null  # ptxas registers and spills
CORE="$(ls "$BUILD"/_core*.so | head -1)"
export TFBN_CORE_PATH="$CORE"

step tests
# a per-test limit (pytest-timeout, where installed) so that one hung kernel costs one test
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT_ARGS=(--timeout 90)
timeout 300 "$PY" -m pytest "$ROOT/tests/gpu" -q -rs -p no:cacheprovider "${TIMEOUT_ARGS[@]}" \
  --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc

step bench
timeout 210 "$PY" "$ROOT/benchmarks/gpu/bench.py" --out "$OUT_DIR" ${TFBN_BENCH_ARGS:---profile} 2>&1 |
  tee "$OUT_DIR/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc

if [ "${TFBN_SANITIZE:-1}" != 0 ] && command -v compute-sanitizer > /dev/null; then
  step sanitizer
  # out-of-bounds accesses in both layouts, float32 and float16, small shapes: the fused
  # op, the split family and the epilogue
  timeout "${TFBN_SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest \
    "$ROOT/tests/gpu" -q -p no:cacheprovider -x \
    -k "(forward_training or backward_training) and (float32 or float16) or empty_batch or (test_against_cpu and float16) or (weighted and float32)" \
    > "$OUT_DIR/sanitizer.log" 2>&1
  rc=$?
  tail -5 "$OUT_DIR/sanitizer.log"
  echo "compute-sanitizer exit status: $rc" | tee -a "$OUT_DIR/sanitizer.log"
  # 99: memcheck found errors (other failures: the tool could not run on this machine)
  [ "$rc" -eq 99 ] && [ "$status" -eq 0 ] && status=$rc
fi

step "done (status $status)"
exit "$status"
