"""Benchmark of the embedded base: build time and peak memory, exact match, and generation throughput
in vLLM (CPU) beside transformers on the same prompts in the same run."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from draftsmith.bench.report import Section
from draftsmith.embedded.build import build_report, heldout_conversations
from draftsmith.embedded.conversations import Conversation
from draftsmith.embedded.exact_match import TurnPrompt, exact_match_report, greedy_answers, turn_prompts
from draftsmith.engines.vllm_offline import run_vllm_chat


def build_section(model_dir: Path) -> Section:
    report = build_report(model_dir)
    section = Section("Embedded base: build and quality", ["measure", "value"])
    section.add("build time (s)", report["build_seconds"])
    section.add("of which pretraining + corpus (s)", report["train_seconds"])
    section.add("peak memory, driver + Ray workers (GiB)", report["peak_memory_bytes"] / 2**30)
    section.add("parameters", report["num_parameters"])
    section.add("vocabulary", report["vocab_size"])
    section.add("pretraining steps", report["train_metrics"].get("steps", "n/a"))
    section.add("exact match, overall (transformers greedy)", report["exact_match"])
    for family, share in report["per_family"].items():
        section.add(f"exact match, {family} ({report['counts'][family]} turns)", share)
    section.add("answers ending with EOS", report["eos_share"])
    section.notes.append(f"Held-out turns: {report['num_turns']}; history is the reference conversation "
                         "(teacher-forced), each assistant turn generated greedily and compared exactly.")
    return section


def _hf_throughput(model_dir: Path, prompts: list[TurnPrompt], max_tokens: int) -> tuple[float, list]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    started = time.perf_counter()
    answers = greedy_answers(model, tokenizer, prompts, max_tokens)
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + int(eos) for text, eos in answers)
    return tokens / seconds, answers


def throughput_section(model_dir: Path, max_prompts: int = 256, max_tokens: int = 96) -> Section:
    conversations = [Conversation.from_record(r) for r in heldout_conversations(model_dir)]
    prompts = turn_prompts(conversations)[:max_prompts]
    vllm = run_vllm_chat(model_dir, [p.messages for p in prompts], max_tokens=max_tokens)
    vllm_answers = [(o["text"], o["finish_reason"] == "stop") for o in vllm["outputs"]]
    vllm_quality = exact_match_report(prompts, vllm_answers)
    hf_tps, hf_answers = _hf_throughput(model_dir, prompts, max_tokens)
    hf_quality = exact_match_report(prompts, hf_answers)
    section = Section("Embedded base: greedy generation throughput (same prompts, one run)",
                      ["engine", "output tokens/s", "ratio to transformers", "exact match"])
    section.add("vLLM (CPU), offline batch", vllm["output_tokens_per_s"], vllm["output_tokens_per_s"] / hf_tps,
                vllm_quality["exact_match"])
    section.add("transformers generate, batch 64", hf_tps, 1.0, hf_quality["exact_match"])
    section.notes.append(f"{len(prompts)} held-out turn prompts, up to {max_tokens} new tokens, float32, "
                         "engine start-up excluded.")
    return section
