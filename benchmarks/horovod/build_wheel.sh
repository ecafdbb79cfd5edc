#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against the project's torch and cache the wheel outside the
# clone. 0.28.1 predates torch >= 2.1, whose headers need C++17; the fix is merged upstream but
# unreleased, so we patch CMAKE_CXX_STANDARD 14 -> 17 in the sdist. CPU-only, gloo controller.
# Usage: build_wheel.sh <venv-python> ; prints the wheel path. Idempotent (reuses the cached wheel).
set -euo pipefail
PY=${1:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, but not through the venv symlink
TORCH=$($PY -c 'import torch; print(torch.__version__.split("+")[0])')
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning_codedreduce/wheels}/torch$TORCH
mkdir -p "$CACHE"
existing=$(ls "$CACHE"/horovod-0.28.1-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$existing" ]; then echo "$existing"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY -m pip download -q --no-deps --no-binary :all: horovod==0.28.1 -d "$work" >&2
tar -xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
src="$work/horovod-0.28.1"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || { echo "patch did not apply" >&2; exit 1; }
$PY -m pip install -q cmake packaging >&2
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
       HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO MAKEFLAGS="-j$(nproc)"
(cd "$src" && $PY -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . >&2)
built=$(ls "$work"/dist/horovod-*.whl)
target="$CACHE/$(basename "$built")"  # keyed by torch version through the folder
cp "$built" "$target"
echo "$target"
