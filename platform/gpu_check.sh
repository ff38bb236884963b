#!/usr/bin/env bash
# `make gpu-check`: the tests that need CUDA (`-m gpu`), in one command of a few minutes, on a GPU machine that
# has Python, CUDA torch (with its Triton) and transformers but no network and none of Ray, vLLM, DeepSpeed or
# ModelOpt; then the EAGLE loss's memory and time, ModelOpt's against the Triton kernel
# (draftsmith/bench/loss_kernel.py).
#
# Prepare on a machine where the project is installed (`make gpu-check-prepare`): it puts the wheels the check
# needs (ModelOpt, pydantic and their few dependencies, 6 MiB) under .whl/ and the embedded test base under
# .gpu-check/base/. On the GPU machine, with both folders beside the checkout, run `bash platform/gpu_check.sh`.
# The figures land in ${OUT:-gpu-check}/figures.json and loss_kernel.md/.json, pytest's log beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpu-check/base ] && export DRAFTSMITH_GPU_BASE=$PWD/.gpu-check/base
export DRAFTSMITH_GPU_FIGURES=$PWD/$out/figures.json PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY' 2>&1 | tee "$out/environment.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "transformers", transformers.__version__)
PY
# -p no:cacheprovider: nothing written into the checkout; the timeouts keep the whole check inside 9 minutes.
timeout 480 "$PYTHON" -m pytest tests/test_gpu.py tests/test_kernels.py -m gpu -p no:cacheprovider -q -rA \
  -o addopts="" --timeout 300 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
[ -f "$out/figures.json" ] && cat "$out/figures.json"
timeout 120 "$PYTHON" -m draftsmith.bench.loss_kernel --cuda-out "$out" 2>&1 | tee "$out/loss_kernel.log"
bench_status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$bench_status
exit "$status"
