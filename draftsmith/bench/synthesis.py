"""Benchmark of synthesis: tokens/s through the synthesis stage's Ray Data actor pool with 1 and 2 vLLM engine
actors, against one plain `vllm.LLM` generate loop over the same prompts, in one run."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from draftsmith.bench.report import Section
from draftsmith.embedded.build import heldout_conversations
from draftsmith.engines.vllm_offline import run_vllm_chat
from draftsmith.recipe.schema import SynthesisSettings, VllmSettings
from draftsmith.synthesis.synthesize import synthesize_conversations


def embedded_prompts(model_dir: Path) -> list[list[dict[str, str]]]:
    """The embedded base's held-out prompts, single-turn (with their system turn, if any)."""
    records = heldout_conversations(model_dir)
    return [[m for m in r["messages"] if m["role"] != "assistant"][: 2 if r["messages"][0]["role"] == "system"
                                                                     else 1] for r in records]


def synthesis_section(model_dir: Path, settings: SynthesisSettings, num_prompts: int = 1024,
                      max_tokens: int = 96, vllm: VllmSettings | None = None,
                      prompts: list[list[dict[str, str]]] | None = None, label: str = "the embedded base",
                      actors: tuple[int, ...] = (1, 2)) -> Section:
    """Single-turn prompts (one round), greedy, so every configuration generates the same tokens."""
    prompts = prompts or embedded_prompts(model_dir)
    # Repeat the prompts up to num_prompts; trailing spaces keep repeats distinct for dedupe.
    prompts = [[*p[:-1], {"role": "user", "content": p[-1]["content"] + " " * (i // len(prompts))}]
               for i, p in enumerate((prompts * (num_prompts // max(1, len(prompts)) + 1))[:num_prompts])]
    section = Section(f"Synthesis on {label}: generated tokens/s (same prompts, one run)",
                      ["configuration", "generated tokens", "wall s (with engine start)", "tokens/s",
                       "ratio to plain vLLM"])
    with tempfile.TemporaryDirectory(prefix="draftsmith-bench-synth-") as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"messages": p}) + "\n" for p in prompts))
        started = time.perf_counter()
        plain = run_vllm_chat(model_dir, prompts, max_tokens=max_tokens, vllm=vllm)
        plain_wall = time.perf_counter() - started
        plain_tps = plain["output_tokens"] / plain_wall
        rows = []
        for count in actors:
            s = settings.model_copy(deep=True)
            s.concurrency, s.shard_size = count, -(-num_prompts // count)  # a shard per actor
            s.sampling.temperature, s.sampling.max_tokens_per_turn = 0.0, max_tokens
            result = synthesize_conversations([(str(data), "openai")], model_dir, s, Path(tmp) / f"out-{count}",
                                              max_bad_share=1.0, vllm=vllm)
            rows.append((f"synthesis stage (Ray Data), {count} vLLM engine actor{'s' if count > 1 else ''}",
                         result["generated_tokens"], result["seconds"]))
    for name, tokens, wall in rows:
        section.add(name, tokens, wall, tokens / wall, (tokens / wall) / plain_tps)
    section.add("plain vllm.LLM.chat, one process", plain["output_tokens"], plain_wall, plain_tps, 1.0)
    section.notes.append(f"{num_prompts} single-turn prompts, greedy, up to {max_tokens} tokens; wall time includes "
                         f"engine start-up for every row (plain generate alone: {plain['output_tokens_per_s']:,.0f} "
                         "tokens/s). The actors split the cores (no core reserved, see "
                         "draftsmith/engines/vllm_args.py and share_of_cores in vllm_cpu.py), so on 2 cores a "
                         "second actor overlaps start-up and halves each engine's threads rather than adding "
                         "compute.")
    return section
