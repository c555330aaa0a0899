#!/usr/bin/env bash
# Builds llama-cpp-python from source with a portable ggml CPU backend and installs it into a venv.
#
# Why: the default build compiles ggml with -march=native. A wheel built that way on one box can
# execute instructions another box does not have (AVX-512 on AMD EPYC Zen 2/3, AMX tile loads on an
# Intel Xeon whose kernel or hypervisor does not grant AMX tile state): the process dies with SIGILL.
# This build names its instruction-set levels explicitly and never compiles AMX or AVX-512 in:
#   x86-64  : SSE4.2 AVX AVX2 FMA F16C BMI2 (x86-64-v3: every AMD/Intel server CPU since 2013-2015)
#   aarch64 : armv8.2-a+dotprod+fp16 (Jetson Orin's Cortex-A78AE, Graviton 2 and later)
# The wheel is cached in ~/.cache/anomaly-edge/wheels/ under a name that carries the flags (and the
# version and CPU architecture), so pip's own wheel cache
# (which does not know about CMAKE_ARGS) can never hand back a natively built one.
#
# usage: scripts/build-llama-cpp.sh VENV [--flavour portable|native|avx512]   (native, avx512: benchmarks only)
set -euo pipefail
VENV=${1:?usage: build-llama-cpp.sh VENV [--flavour portable|native]}
FLAVOUR=portable
if [ "${2:-}" = "--flavour" ]; then FLAVOUR=${3:?--flavour needs portable or native}; fi
SPEC=${LLAMA_CPP_SPEC:-llama-cpp-python==0.3.36}
ARCH=$(uname -m)
COMMON="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF"
case "$FLAVOUR:$ARCH" in
  portable:x86_64)
    FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  portable:aarch64|portable:arm64)
    FLAGS="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;;
  native:*)
    FLAGS="-DGGML_NATIVE=ON" ;;
  avx512:x86_64)  # benchmarks only: everything a native build on an AVX-512 Xeon has, except AMX
    FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *)
    echo "build-llama-cpp.sh: no portable flag set for CPU architecture '$ARCH' (flavour '$FLAVOUR')" >&2; exit 2 ;;
esac
CMAKE_ARGS_ALL="$FLAGS $COMMON"
TAG=$(printf '%s %s %s' "$SPEC" "$ARCH" "$CMAKE_ARGS_ALL" | sha256sum | cut -c1-12)
CACHE=${ANOMALY_EDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anomaly-edge}
WHEELS="$CACHE/wheels/llama-cpp-$FLAVOUR-$ARCH-$TAG"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building $SPEC ($FLAVOUR, $ARCH) — a few minutes on 2 cores"
  echo "  CMAKE_ARGS=$CMAKE_ARGS_ALL"
  mkdir -p "$WHEELS.tmp"
  CMAKE_ARGS="$CMAKE_ARGS_ALL" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FORCE_CMAKE=1 \
    "$VENV/bin/pip" wheel --quiet --no-deps --no-cache-dir --wheel-dir "$WHEELS.tmp" "$SPEC"
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
"$VENV/bin/pip" install --quiet --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
# The dependencies of llama-cpp-python itself (numpy, jinja2, diskcache, typing-extensions).
"$VENV/bin/pip" install --quiet "$SPEC" 2>/dev/null || true
printf 'flavour=%s\narch=%s\nspec=%s\ncmake_args=%s\n' "$FLAVOUR" "$ARCH" "$SPEC" "$CMAKE_ARGS_ALL" > "$VENV/llama-cpp-build.txt"
echo "llama-cpp-python installed ($FLAVOUR build): $VENV/llama-cpp-build.txt"
