#!/bin/bash
# Checks that `cargo build --release --features cuda` builds on a machine with
# no GPU and no CUDA toolkit: assembles CUDA 13.5 from NVIDIA's PyPI wheels
# under ~/.cache/inferalign/cuda13 and builds into target-cuda/. About an hour
# on 2 cores (ggml-cuda's kernels); not part of the test suite.
# The binary needs a real driver (libcuda.so.1) to start: the libcuda here is
# a link-time stand-in. On a machine with a real toolkit none of this is
# needed: see the README's "GPU builds".
# Usage: scripts/cuda-build-check.sh [COMPUTE_CAP, default 80]
set -euo pipefail
CAP=${1:-80}
CACHE=${INFERALIGN_CACHE:-$HOME/.cache/inferalign}/cuda13
VENV=$CACHE/venv ROOT=$CACHE/root
cd "$(dirname "$0")/.."

if [ ! -x "$ROOT/bin/nvcc" ]; then
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    # The CUDA 13 wheels are the first whose nvcc wheel carries nvcc itself (the cu12 ones ship ptxas only).
    "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.5.37 nvidia-nvvm==13.5.37 nvidia-cuda-runtime==13.5.37 \
        nvidia-cuda-crt==13.5.37 nvidia-cuda-nvrtc==13.5.37 nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25 \
        nvidia-cuda-cccl==13.3.5.0.6
    SRC=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    rm -rf "$ROOT.part" && cp -al "$SRC" "$ROOT.part"   # nvcc finds nvvm/ and include/ through bin/..
    (
        cd "$ROOT.part/lib"
        for f in *.so.*; do b=${f%%.so.*}.so; [ -e "$b" ] || ln -s "$f" "$b"; done
        ln -sfn lib ../lib64   # llama-cpp-sys-2 and cudarc look in lib64
        mkdir -p stubs && cd stubs
        # No wheel ships libcuda (the driver's): a stand-in with every cu* function cuda.h names, for the linker only.
        { echo '#include <cuda.h>' | gcc -E -I"$ROOT.part/include" -x c - | tr '\n' ' ' | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\('
          grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$ROOT.part/include/cuda.h"; } | sed 's/[[:space:](]//g' | sort -u \
          | sed 's/.*/int &(void){return 999;}/' > libcuda_stub.c
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so libcuda_stub.c
        # llama-cpp-sys-2 always links these static libraries on Linux; the wheels have only the
        # shared cuBLAS, which cudarc links, so empty archives let the link resolve from it.
        for l in cublas_static cublasLt_static culibos; do rm -f "lib$l.a"; ar rc "lib$l.a"; done
    )
    mv "$ROOT.part" "$ROOT"
fi

export CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_TOOLKIT_ROOT_DIR=$ROOT CUDACXX=$ROOT/bin/nvcc PATH=$ROOT/bin:$PATH
export CUDA_LIBRARY_PATH=$ROOT   # llama-cpp-sys-2 on Linux looks only here, /opt/cuda and /usr/local/cuda*
export LIBRARY_PATH=$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDAARCHS=$CAP CUDA_COMPUTE_CAP=$CAP   # one architecture (CMake's and candle's), no nvidia-smi needed
export CUDARC_CUDA_VERSION=13040   # cudarc 0.19 knows CUDA up to 13.4
"$ROOT/bin/nvcc" --version | tail -1
time cargo build --release --features cuda --target-dir target-cuda
ls -la target-cuda/release/inferalign
