#!/usr/bin/env bash
# `make gpu-check-prepare`: what the GPU machine lacks for `make gpu-check`, into folders git ignores:
# .whl/ (the installed versions of ModelOpt, pydantic and their dependencies, as cp312 wheels: the GPU machine's
# Python is 3.12) and .gpu-check/base/ (the embedded test base, built here with Ray if it is not cached yet).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
pkgs=(nvidia-modelopt pydantic pydantic-core annotated-types typing-inspection omegaconf antlr4-python3-runtime pulp)
pins=()
for p in "${pkgs[@]}"; do pins+=("$p==$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')"); done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
base=$("$PY" - <<'PY'
import sys
sys.path.insert(0, "tests")
from conftest import TINY_BASE_OVERRIDES  # also points DRAFTSMITH_CACHE_DIR at the tests' cache
from draftsmith.embedded.build import build_embedded_base, embedded_base_dir, is_built
from draftsmith.recipe.loader import load_recipe
settings = load_recipe("tiny-eagle3", TINY_BASE_OVERRIDES).base.embedded
if not is_built(settings):
    from draftsmith import cluster, tracking
    from draftsmith.recipe.schema import RaySettings, TrackingSettings
    import tempfile
    cluster.connect(RaySettings())
    tracking.configure(TrackingSettings(), tempfile.mkdtemp())
    build_embedded_base(settings, tracking_uri=tracking.current_uri())
print(embedded_base_dir(settings))
PY
)
rm -rf .gpu-check && mkdir -p .gpu-check && cp -r "$(echo "$base" | tail -n 1)" .gpu-check/base
du -sh .whl .gpu-check
echo "carry .whl and .gpu-check; run: bash platform/gpu_check.sh"
