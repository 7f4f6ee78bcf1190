#!/usr/bin/env bash
# On a GPU machine with torch (a CUDA build), nvcc and the build tools installed, and no
# network: build growdense with its CUDA kernels, run the CUDA tests, run the layer
# benchmark on the GPU (with each GEMM path forced, too, to place the size threshold),
# and write every log into OUT_DIR.
#
#   benchmarks/run_gpu.sh OUT_DIR
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST to build for other GPUs than Hopper (e.g. "8.0;9.0+PTX").
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export GROWDENSE_CUDA=ON  # fail the build rather than silently build without the kernels
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # no network: never try to download

failed=()
# step NAME COMMAND...: runs COMMAND with its output in OUT_DIR/NAME.log.
step() {
  local name="$1"
  shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - start)) s; log: $out/$name.log"
  tail -n 4 "$out/$name.log" | sed 's/^/   | /'
  if [ $rc -ne 0 ]; then failed+=("$name"); fi
  return $rc
}

step environment bash -c "nvidia-smi; '$CUDA_HOME/bin/nvcc' --version; $py -c '
import torch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")
'; $py -m pip list 2>/dev/null | grep -i -E 'torch|scikit|pybind|cmake|ninja|pytest'"

if ! step build "$py" -m pip install -v --no-build-isolation --no-deps --force-reinstall .; then
  echo "build failed: see $out/build.log" >&2
  exit 1
fi
# The tests import the installed package, not the source tree.
step info "$py" -m growdense info
step tests "$py" -m pytest -q -rs tests/test_cuda.py tests/test_cuda_build.py tests/test_cuda_kernels_host.py \
  --junitxml="$out/tests.xml"

if [ -f benchmarks/bench_layer.py ]; then
  step bench_layer "$py" benchmarks/bench_layer.py --device cuda --json "$out/bench_layer.json"
  # The same layers with each GEMM path forced: where the fused kernel stops paying.
  for path in fused blas; do
    step "bench_layer_$path" env GROWDENSE_CUDA_GEMM=$path "$py" benchmarks/bench_layer.py --device cuda \
      --sizes vae,sweep --ratios 1 --modes fwd,fwd+bwd --json "$out/bench_layer_$path.json"
  done
else
  echo "== benchmarks/bench_layer.py is not in this tree: no benchmark run"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "all steps passed; logs in $out"
