"""Benchmark of the ways a vLLM engine can start (the recipe's `vllm` section): compiled (the default), eager
(`enforce_eager`) and eager in process (`in_process`), the same prompts through each in one run: start-up,
decode speed, and where compiling pays back."""

from __future__ import annotations

import time
from pathlib import Path

from draftsmith.bench.report import Section
from draftsmith.embedded.build import heldout_conversations
from draftsmith.engines.vllm_offline import run_vllm_plan, warm_engine_server
from draftsmith.recipe.schema import VllmSettings

MODES = {
    "compiled (the default)": VllmSettings(),
    "eager (enforce_eager)": VllmSettings(enforce_eager=True),
    "eager, in process (+ in_process)": VllmSettings(enforce_eager=True, in_process=True),
}


def engine_mode_section(model_dir: Path, num_prompts: int = 32, max_tokens: int = 96) -> Section:
    """One request at a time (the latency-bound case) and all prompts in flight (the synthesis case)."""
    records = heldout_conversations(model_dir)[:num_prompts]
    conversations = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"][:1]} for r in records]
    runs = [{"name": f"concurrency-{c}", "conversations": conversations, "temperature": 0.0,
             "max_tokens": max_tokens, "concurrency": c} for c in (1, len(conversations))]
    measured = {}
    warm_engine_server()  # every mode's engine process starts with vLLM imported, the first one's too
    for name, settings in MODES.items():
        started = time.perf_counter()
        results = run_vllm_plan(model_dir, runs, vllm=settings)
        wall = time.perf_counter() - started
        measured[name] = (wall - sum(r["seconds"] for r in results), results)
    section = Section("vLLM engine start: compiled, eager, eager in process (same prompts, one run)",
                      ["mode", "start-up s", "tokens/s, 1 in flight", f"tokens/s, {len(conversations)} in flight",
                       "start-up ratio to compiled", "tokens/s ratio to compiled (1 in flight)"])
    compiled_start, compiled_runs = measured["compiled (the default)"]
    for name, (start, results) in measured.items():
        section.add(name, start, results[0]["output_tokens_per_s"], results[1]["output_tokens_per_s"],
                    start / compiled_start,
                    results[0]["output_tokens_per_s"] / compiled_runs[0]["output_tokens_per_s"])
    eager_start, eager_runs = measured["eager (enforce_eager)"]
    saved_per_token = 1 / eager_runs[0]["output_tokens_per_s"] - 1 / compiled_runs[0]["output_tokens_per_s"]
    if saved_per_token > 0:
        section.notes.append(f"Compiling pays back after about {(compiled_start - eager_start) / saved_per_token:,.0f} "
                             "generated tokens at one request at a time.")
    else:
        section.notes.append("Compiled decoding was not faster than eager here: eager is the better choice.")
    section.notes.append(f"{len(conversations)} held-out first turns, greedy, up to {max_tokens} tokens; start-up is "
                         "the call's wall time less generation (the engine process, forked with vLLM imported, the "
                         "engine, compilation, warm-up).")
    return section
