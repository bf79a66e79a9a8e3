#!/usr/bin/env bash
# Create .venv-litellm with the LiteLLM proxy used as the comparison target in
# bench/overhead.py. Idempotent: re-running only installs what is missing.
set -euo pipefail

LITELLM_VERSION="1.106.2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-litellm"
PYTHON="${PYTHON:-python3.11}"

if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "creating ${VENV} with ${PYTHON}"
    "${PYTHON}" -m venv "${VENV}"
fi

have="$("${VENV}/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || true)"
if [[ "${have}" == "${LITELLM_VERSION}" && -x "${VENV}/bin/litellm" ]] \
    && "${VENV}/bin/python" -c 'import litellm.proxy.proxy_server' >/dev/null 2>&1; then
    echo "litellm[proxy]==${LITELLM_VERSION} already installed in ${VENV}"
    exit 0
fi

"${VENV}/bin/python" -m pip install --quiet --upgrade pip
"${VENV}/bin/python" -m pip install --quiet "litellm[proxy]==${LITELLM_VERSION}"
"${VENV}/bin/litellm" --version >/dev/null 2>&1 || true
echo "installed litellm[proxy]==${LITELLM_VERSION} into ${VENV}"
