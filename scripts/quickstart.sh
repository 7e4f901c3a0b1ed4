#!/usr/bin/env bash
# One command on a fresh machine: install, then stream a completion from the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m nbengine generate "${1:-Write a haiku about the sea.}" --stats
