"""Judge a chat model on held-out generated conversations: exact-match share per task family, and EOS share."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from draftsmith.embedded.conversations import Conversation


@dataclass
class TurnPrompt:
    """One assistant turn to produce, given the reference conversation before it (teacher-forced history)."""

    messages: list[dict[str, str]]
    reference: str
    kind: str


def turn_prompts(conversations: list[Conversation]) -> list[TurnPrompt]:
    prompts = []
    for conv in conversations:
        history = [{"role": "system", "content": conv.system}] if conv.system else []
        for turn in conv.turns:
            history = history + [{"role": "user", "content": turn.user}]
            prompts.append(TurnPrompt(list(history), turn.assistant, turn.kind))
            history = history + [{"role": "assistant", "content": turn.assistant}]
    return prompts


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list[TurnPrompt], max_new_tokens: int, batch_size: int = 64
                   ) -> list[tuple[str, bool]]:
    """Greedy answers (text, ended with EOS) for each prompt, batched with left padding."""
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ended = tokenizer.eos_token_id in row
            if ended:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return answers


def exact_match_report(prompts: list[TurnPrompt], answers: list[tuple[str, bool]]) -> dict:
    """Shares of exactly right answers per kind (task family or follow-up) and overall, and the EOS share."""
    assert len(prompts) == len(answers)
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    ended = 0
    misses = []
    for prompt, (text, eos) in zip(prompts, answers, strict=True):
        total[prompt.kind] += 1
        ended += eos
        if eos and text == prompt.reference:
            right[prompt.kind] += 1
        elif len(misses) < 20:
            misses.append({"kind": prompt.kind, "expected": prompt.reference, "got": text, "eos": eos})
    n = len(prompts)
    return {
        "exact_match": sum(right.values()) / n,
        "eos_share": ended / n,
        "per_family": {k: right[k] / total[k] for k in sorted(total)},
        "counts": {k: total[k] for k in sorted(total)},
        "num_turns": n,
        "sample_misses": misses,
    }
