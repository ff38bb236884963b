"""The embedded base: built with Ray Train + DeepSpeed, cached by settings, loadable by transformers and vLLM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftsmith.base_model import validate_causal_lm_folder
from draftsmith.embedded.build import (
    build_embedded_base,
    build_report,
    embedded_base_dir,
    heldout_conversations,
    is_built,
)
from draftsmith.embedded.conversations import Conversation
from draftsmith.embedded.exact_match import greedy_answers, turn_prompts
from draftsmith.engines.vllm_offline import run_vllm_chat
from draftsmith.pipeline.stage import DONE_MARKER

pytestmark = pytest.mark.slow


def test_build_writes_a_hugging_face_folder_and_a_report(tiny_base, tiny_recipe):
    assert tiny_base == embedded_base_dir(tiny_recipe.base.embedded)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tiny_base / name).is_file(), name
    validate_causal_lm_folder(tiny_base)
    report = build_report(tiny_base)
    assert 0.0 <= report["exact_match"] <= 1.0
    assert 0.0 <= report["eos_share"] <= 1.0
    assert set(report["per_family"]) >= set(tiny_recipe.base.embedded.corpus.families)
    assert report["train_metrics"]["steps"] > 0
    assert report["peak_memory_bytes"] > 0
    assert (tiny_base / "plots" / "pretrain_loss.png").stat().st_size > 1000
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["head_dim"] == 32 and config["architectures"] == ["LlamaForCausalLM"]


def test_build_is_cached_by_settings_hash(tiny_base, tiny_recipe):
    marker = tiny_base / DONE_MARKER
    before = marker.stat().st_mtime_ns
    assert is_built(tiny_recipe.base.embedded)
    assert build_embedded_base(tiny_recipe.base.embedded) == tiny_base
    assert marker.stat().st_mtime_ns == before  # not rebuilt
    other = tiny_recipe.base.embedded.model_copy(deep=True)
    other.corpus.seed += 1
    assert embedded_base_dir(other) != tiny_base
    assert not is_built(other)


def test_loads_in_transformers_and_stops_on_eos(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    prompts = turn_prompts([Conversation.from_record(r) for r in heldout_conversations(tiny_base)[:4]])
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=24)
    assert len(answers) == len(prompts)
    assert all(isinstance(text, str) for text, _ in answers)


def test_vllm_cpu_generates_what_transformers_generates(tiny_base):
    """vLLM (CPU) loads the folder; its greedy tokens agree with transformers' on held-out prompts."""
    records = heldout_conversations(tiny_base)[:6]
    conversations = [[m for m in r["messages"] if m["role"] != "assistant"][:2] for r in records]
    # keep each prompt up to its first user turn, the same in both engines
    conversations = [c[: next(i for i, m in enumerate(c) if m["role"] == "user") + 1] for c in conversations]
    result = run_vllm_chat(tiny_base, conversations, max_tokens=16)
    assert len(result["outputs"]) == len(conversations)
    assert result["output_tokens"] > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    agree = 0
    for conv, out in zip(conversations, result["outputs"], strict=True):
        enc = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        vllm_ids = out["token_ids"]
        n = min(len(ids), len(vllm_ids), 8)
        agree += ids[:n] == vllm_ids[:n]
    # fp32 in both; an undertrained model can hit near-ties, so allow one prompt to diverge
    assert agree >= len(conversations) - 1
