#!/usr/bin/env bash
# The real llama.cpp server (`llama-server`, with /metrics and /slots) for the self-hosted pool tests
# and bench/selfhosted_balance.py. Built offline from the llama.cpp sources that the
# llama-cpp-python sdist on PyPI carries (vendor/llama.cpp): about 10 minutes on 2 cores, once.
# Cached: a warm machine (binary present and answering --version) does not rebuild.
# Usage: scripts/build-llama-server.sh [VENV_BIN]   -> .margin/bin/llama-server
set -euo pipefail
BIN=${1:-.venv/bin}
VERSION=0.3.36                       # the llama-cpp-python release pinned in pyproject.toml
OUT=.margin/bin/llama-server
WORK=.margin/build
# Cached per machine too (like pip's wheel cache), so a fresh clone on a warm machine copies it.
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/margin/llama-server-$VERSION-avx2"
if [ -x "$OUT" ] && [ -f "$OUT.ok" ] && "$OUT" --version >/dev/null 2>&1; then
  exit 0
fi
if [ -x "$CACHE" ] && "$CACHE" --version >/dev/null 2>&1; then
  mkdir -p .margin/bin && cp "$CACHE" "$OUT" && touch "$OUT.ok"
  echo "llama-server: from the machine cache ($CACHE)"
  exit 0
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  echo "installing build tools (cmake, g++) for llama-server"
  apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
fi
mkdir -p "$WORK" .margin/bin
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$BIN/pip" download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$WORK" -q
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST" -C "$WORK"
echo "== building llama-server from llama.cpp (llama-cpp-python $VERSION sdist): ~10 min on 2 cores, once =="
start=$(date +%s)
# No web UI (it would be downloaded from Hugging Face), no HTTPS, no tests: the server alone, static.
# Portable x86-64 AVX2 code rather than -march=native: on a VM that reports AVX-512/AMX the native
# build stops with SIGILL at its first matrix product (seen on this project's CI machine).
cmake -S "$SRC" -B "$WORK/llama-server" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  >"$WORK/llama-server-cmake.log" 2>&1 || { echo "cmake failed: see $WORK/llama-server-cmake.log"; exit 1; }
cmake --build "$WORK/llama-server" --target llama-server -j "$(nproc)" 2>&1 | tee "$WORK/llama-server-build.log" \
  | grep --line-buffered -E '^\[ *[0-9]+%\]' \
  | while IFS= read -r line; do printf '  [%4ds] %s\n' "$(( $(date +%s) - start ))" "${line:0:110}"; done
cp "$WORK/llama-server/bin/llama-server" "$OUT"
"$OUT" --version >/dev/null 2>&1 || { echo "llama-server build failed: see $WORK/llama-server-build.log"; exit 1; }
touch "$OUT.ok"  # built by this script with the flags above (an older -march=native binary is rebuilt)
mkdir -p "$(dirname "$CACHE")" && cp "$OUT" "$CACHE"
echo "== llama-server ready in $(( $(date +%s) - start )) s: $OUT =="
