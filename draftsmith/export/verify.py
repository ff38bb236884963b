"""The export's round trip through a real engine: vLLM loads the exported draft beside the base and generates;
speculative decoding is lossless, so greedy output must equal the base's own greedy output token for token."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from draftsmith.engines.vllm_offline import chat_run, engine_plan, run_vllm_engines, with_outputs
from draftsmith.export.engine_configs import vllm_runtime_config
from draftsmith.pipeline.artifacts import RoundTrip, RoundTripSample
from draftsmith.recipe.schema import VllmSettings

log = logging.getLogger(__name__)


class RoundTripError(RuntimeError):
    """vLLM's output with the draft differs from its output without it: the export is wrong."""


def first_user_turns(conversation_files: list[str], count: int) -> list[list[dict[str, str]]]:
    """The opening user message of the first `count` conversations (OpenAI chat jsonl), as prompts."""
    prompts: list[list[dict[str, str]]] = []
    for path in conversation_files:
        with open(path) as f:
            for line in f:
                messages = json.loads(line).get("messages", [])
                user = next((m for m in messages if m.get("role") == "user"), None)
                if user is not None:
                    prompts.append([{"role": "user", "content": user["content"]}])
                if len(prompts) == count:
                    return prompts
    return prompts


def greedy_round_trip(base_dir: Path, speculative_config: dict[str, Any], prompts: list[list[dict[str, str]]],
                      max_tokens: int, device: str = "cpu", vllm: VllmSettings | None = None) -> RoundTrip:
    """Run the base with and without the draft in vLLM (one process, one engine after the other); return the
    comparison and vLLM's acceptance counters."""
    runs = [chat_run(prompts, max_tokens)]
    (plain,), (drafted,) = run_vllm_engines([engine_plan(base_dir, runs), engine_plan(
        base_dir, runs, vllm_runtime_config(speculative_config))], device=device, vllm=vllm, timeout_s=900.0)
    plain, drafted = with_outputs(plain), with_outputs(drafted)
    mismatches = [i for i, (a, b) in enumerate(zip(plain["outputs"], drafted["outputs"], strict=True))
                  if a["token_ids"] != b["token_ids"]]
    counters = drafted["spec_decode"] or {}
    result = RoundTrip(
        prompts=len(prompts), identical=not mismatches, mismatched_prompts=mismatches,
        output_tokens=drafted["output_tokens"], acceptance_length=counters.get("acceptance_length"),
        num_drafts=counters.get("num_drafts", 0), num_accepted_tokens=counters.get("num_accepted_tokens", 0),
        accepted_per_position=counters.get("num_accepted_tokens_per_pos"),
        tokens_per_s={"base": plain["output_tokens_per_s"], "with_draft": drafted["output_tokens_per_s"]},
        samples=[RoundTripSample(messages=prompt, text=out["text"])
                 for prompt, out in zip(prompts, plain["outputs"], strict=True)])
    log.info("vLLM round trip: %d prompts, identical=%s, acceptance length %s", len(prompts), result.identical,
             result.acceptance_length)
    return result
