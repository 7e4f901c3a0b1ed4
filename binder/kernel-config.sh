#!/bin/bash
# Install the kernel config (extension auto-load) and JupyterLab settings for the current $HOME.
# Called by postBuild; the tests run it with a temporary HOME and check a kernel has the magics.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
profile="${IPYTHONDIR:-$HOME/.ipython}/profile_default"
mkdir -p "$profile"
cp "$here/ipython_kernel_config.py" "$profile/ipython_kernel_config.py"
settings="${JUPYTERLAB_SETTINGS_DIR:-$HOME/.jupyter/lab/user-settings}/@jupyterlab/notebook-extension"
mkdir -p "$settings"
echo '{"windowingMode": "none"}' > "$settings/tracker.jupyterlab-settings"
