# The two commands of the README: `make demo` (the main job end to end on the embedded default) and
# `make test` (the test suite). Both set up .venv themselves on a fresh machine with Python 3.11.
PY := .venv/bin/python
# Tools the tests start (mlflow, ray) and jobs they submit resolve to the project environment.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM := false
RECIPE ?= tiny-eagle3

.PHONY: setup demo demo-stop test test-fast bench gpu-check gpu-check-prepare clean

# The project's own modules get their bytecode here too (install.sh writes the environment's; see there why).
setup:
	@bash platform/install.sh
	@$(PY) -m compileall -qq draftsmith jobs serve kernels

# The pipeline, then the champion served on a local Ray head node and asked one question; the endpoint keeps
# running until `make demo-stop` (`ray stop`: every Ray on this machine).
demo: setup
	$(PY) -m jobs.pipeline --recipe $(RECIPE)
	.venv/bin/draftsmith serve --recipe $(RECIPE)

demo-stop:
	.venv/bin/ray stop

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

bench: setup
	$(PY) -m jobs.bench --recipe $(RECIPE)

# The tests that need CUDA, on a GPU machine without network or the project's environment (see the script).
gpu-check:
	@bash platform/gpu_check.sh

# Here, where the project is installed: the wheels and the test base that gpu-check carries to the GPU machine.
gpu-check-prepare: setup
	@bash platform/gpu_check_prepare.sh

clean:
	rm -rf runs bench-results .pytest_cache gpu-check .gpu-check .whl
