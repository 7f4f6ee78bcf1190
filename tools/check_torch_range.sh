#!/usr/bin/env bash
# Build growdense and run its test suite against each given torch release, each in
# its own virtual environment, and print one summary line per release.
#
# Usage: tools/check_torch_range.sh [TORCH_VERSION ...]      (default: 2.11.0 2.15.0)
#
# Environment:
#   GROWDENSE_VENVS      where the environments live (default: .venvs/ in the repository);
#                        one per release, torch-<version>/, reused when it already holds
#                        that torch, so a second run only rebuilds and retests.
#   GROWDENSE_RANGE_LOGS where the full logs go (default: $GROWDENSE_VENVS/logs).
#   PYTHON               the interpreter the environments are made from (default: python3).
#   TORCHVISION          the torchvision to install (default: the release paired with that
#                        torch, see torchvision_for; "none" installs none).
#   GROWDENSE_CUDA       AUTO (default), ON or OFF, passed to the build: AUTO builds the CUDA
#                        kernels when $CUDA_HOME/bin/nvcc (or /usr/local/cuda/bin/nvcc) exists
#                        and that torch is a CUDA build of the same CUDA release (major.minor:
#                        the CUDA headers that come with torch's wheels must match nvcc), else
#                        the CPU-only extension; the rule is the build's own
#                        (cmake/GrowdenseCuda.cmake).
#
# Exit status: 0 when every release built and passed its tests, 1 otherwise.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venvs=${GROWDENSE_VENVS:-$repo/.venvs}
logs=${GROWDENSE_RANGE_LOGS:-$venvs/logs}
python=${PYTHON:-python3}
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then versions=(2.11.0 2.15.0); fi
mkdir -p "$venvs" "$logs"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH  # the tests must import the installed package, not a source tree

# The torchvision release made for a torch release: 0.26.0 asks for torch==2.11.0;
# 0.29.1 and 0.29.2 (the newest on the registry, none was made for 2.15) for torch>=2.14.0.
torchvision_for() {
  case "$1" in
    2.11.*) echo 0.26.0 ;;
    2.14.*) echo 0.29.1 ;;
    2.15.*) echo 0.29.2 ;;
    *) echo "" ;;  # unknown here: let pip choose one that accepts this torch
  esac
}

nvcc=""
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [ -x "$candidate" ]; then nvcc=$candidate; break; fi
done
nvcc_cuda=""
if [ -n "$nvcc" ]; then
  nvcc_cuda=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
fi

summary=()
status=0
for version in "${versions[@]}"; do
  start=$(date +%s)
  venv=$venvs/torch-$version
  log_install=$logs/torch-$version-install.log
  log_build=$logs/torch-$version-build.log
  log_test=$logs/torch-$version-test.log
  echo "=== torch $version: environment $venv, logs $logs/torch-$version-*.log"

  # ---- the environment and its torch ----------------------------------------
  if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv"; fi
  py=$venv/bin/python
  have=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  tv=${TORCHVISION:-$(torchvision_for "$version")}
  : >"$log_install"
  if [ "$have" != "$version" ]; then
    echo "installing torch $version${tv:+ and torchvision $tv} (a few GB the first time)"
    pkgs=("torch==$version")
    if [ "$tv" != none ]; then pkgs+=("torchvision${tv:+==$tv}"); fi
    # Both are pinned here, so a site-wide cap on torch (a pip constraint file) would
    # only forbid the requested release: it is lifted for this one command.
    if ! PIP_CONSTRAINT=/dev/null "$py" -m pip install "${pkgs[@]}" >>"$log_install" 2>&1; then
      echo "torch $version: installing torch failed, see $log_install"; tail -n 20 "$log_install"
      summary+=("| $version | - | install failed | - | $(( $(date +%s) - start )) s |")
      status=1
      continue
    fi
  else
    echo "reusing the environment's torch $have"
  fi
  if ! "$py" -m pip install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.28" ninja \
      pytest hypothesis matplotlib tqdm numpy >>"$log_install" 2>&1; then
    echo "torch $version: installing the build and test tools failed, see $log_install"
    tail -n 20 "$log_install"
    summary+=("| $version | - | install failed | - | $(( $(date +%s) - start )) s |")
    status=1
    continue
  fi
  read -r torch_full torch_cuda tv_have < <("$py" - <<'EOF'
import importlib.metadata as md
import torch
try:
    tv = md.version("torchvision")
except md.PackageNotFoundError:
    tv = "none"
print(torch.__version__, torch.version.cuda or "none", tv)
EOF
)

  # ---- the build ----------------------------------------------------------------
  # The build decides whether the CUDA kernels are built (cmake/GrowdenseCuda.cmake: nvcc's
  # CUDA release must be torch's, else the CPU-only extension with a warning); this script
  # only passes GROWDENSE_CUDA through and reports what the build chose.
  cuda=${GROWDENSE_CUDA:-AUTO}
  why="torch's CUDA $torch_cuda, nvcc's ${nvcc_cuda:-none}"
  echo "building growdense against torch $torch_full (GROWDENSE_CUDA=$cuda; $why)"
  build_env=(GROWDENSE_CUDA="$cuda" PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv")
  if [ -n "$nvcc" ]; then build_env+=(CUDA_HOME="$(dirname "$(dirname "$nvcc")")"); fi
  # One build folder per torch release: the default one is shared by every environment,
  # and CMake's cache there would hold another environment's torch. Ninja keeps going
  # after an error (-k0) so that the log names every file that fails to compile.
  if env "${build_env[@]}" "$py" -m pip install -v --no-build-isolation --no-deps \
      --force-reinstall --config-settings=build-dir="$repo/build/torch-$version" \
      --config-settings=build.tool-args=-k0 "$repo" \
      >"$log_build" 2>&1; then
    build=ok
    # what the build chose, and why when it left the CUDA kernels out
    cuda=$(cd / && "$py" -c 'import growdense; print("ON" if growdense.build_info()["with_cuda"] else "OFF")' \
      2>/dev/null || echo "?")
    grep -A4 "growdense: building" "$log_build" | sed 's/^/  /' || true
  else
    build=failed
    echo "torch $version: the build failed, see $log_build; its errors:"
    grep -E "error|Error" "$log_build" | head -n 40 || true
  fi

  # ---- the tests -----------------------------------------------------------------
  tests="not run"
  if [ $build = ok ]; then
    echo "running the test suite (log: $log_test)"
    set +e
    (cd "$repo" && env "${build_env[@]}" "$py" -m pytest -q tests) >"$log_test" 2>&1
    rc=$?
    set -e
    tests=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$log_test" | tail -n 1 \
            | sed -E 's/^=+ //; s/ =+$//')
    if [ $rc -ne 0 ]; then
      status=1
      grep -E "^(FAILED|ERROR) " "$log_test" || true
    fi
  else
    status=1
  fi
  seconds=$(( $(date +%s) - start ))
  line="| $torch_full | $tv_have | $cuda | $build | ${tests:-?} | $seconds s |"
  echo "$line"
  summary+=("$line")
done

echo
echo "| torch | torchvision | CUDA kernels | build | tests | time |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $status
