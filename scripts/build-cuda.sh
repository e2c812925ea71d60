#!/usr/bin/env bash
# Builds `semcache` with candle's CUDA backend on a machine without a GPU or a system CUDA:
# NVIDIA's CUDA 13.0 toolkit comes from PyPI wheels, and a link-time stub stands in for
# the driver's libcuda.so (SONAME libcuda.so.1). The binary lands in target/cuda/release/.
#
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda.sh     # 90: H100/H200, 80: A100, 89: L4, 75: T4
#
# At run time the binary needs the NVIDIA driver's libcuda.so.1 (and the CUDA 13 runtime
# libraries: LD_LIBRARY_PATH=$(scripts/build-cuda.sh --print-lib-path)). A cold build
# takes about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${XDG_CACHE_HOME:-$HOME/.cache}/semcache/cuda-13.0-venv"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85
  touch "$venv/.complete"
fi
cuda=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
if [ "${1:-}" = "--print-lib-path" ]; then
  echo "$cuda/lib"
  exit 0
fi

# Unversioned names for the linker (the wheels ship only libX.so.N).
links="$venv/link"
mkdir -p "$links"
for lib in "$cuda"/lib/lib*.so.*; do
  base=$(basename "$lib")
  ln -sf "$lib" "$links/${base%%.so.*}.so"
done

# A stub libcuda.so exporting every driver entry point named in cuda.h, so the binary links
# against SONAME libcuda.so.1, which the real driver provides at run time.
if [ ! -f "$links/libcuda.so" ] || [ "$links/libcuda.so" -ot "$cuda/include/cuda.h" ]; then
  gcc -E -P -I"$cuda/include" "$cuda/include/cuda.h" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | awk '{ print "void " $0 "(void) {}" }' > "$links/cuda_stub.c"
  gcc -shared -fPIC -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1 "$links/cuda_stub.c"
fi

export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_TOOLKIT_ROOT_DIR="$cuda"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$links:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -n 2
cargo build --release --locked --features cuda --bin semcache --target-dir target/cuda
echo "built target/cuda/release/semcache for compute capability $CUDA_COMPUTE_CAP"
