"""Which tokens of a conversation are the assistant's (the draft's loss mask), for any chat template.

A template with `{% generation %}` tags says so itself (`return_assistant_tokens_mask`). Most published ones
(Llama 3, Qwen, ChatML, Mistral, Gemma) carry none, so the spans are derived by rendering: the conversation up to
each assistant turn with the generation prompt must be a prefix of the whole rendering (what the model saw
before it answered); the turn runs from there through its content to the first stop token after it (EOS or a
generation-config end-of-turn token such as `<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`), which the draft must
learn to predict. Whatever the template adds between the prompt and the content (Qwen 3's empty
`<think>\\n\\n</think>` before a final answer) is the model's own output and is kept. A template that renders a
prefix differently from the whole, or rewrites the content, is refused with a message naming the turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateMaskError(ValueError):
    """The chat template gives no way to tell the assistant's tokens apart."""


def has_generation_tags(template: str | None) -> bool:
    return bool(template) and GENERATION_TAG.search(template) is not None


def stop_tokens(tokenizer, eos_token_ids: Sequence[int] = ()) -> list[str]:
    """The token texts that end an assistant turn: the tokenizer's EOS and the generation config's EOS ids."""
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    found += [tokenizer.convert_ids_to_tokens(int(i)) for i in eos_token_ids]
    return list(dict.fromkeys(t for t in found if t))


def _render(tokenizer, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, Any]], stops: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    full = _render(tokenizer, messages, generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = []
    for i in turns:
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prompt):
            raise ChatTemplateMaskError(
                f"the chat template renders the conversation before assistant turn {i} differently from the whole "
                "conversation, so its assistant tokens cannot be found; give the template {% generation %} tags "
                "around each assistant turn"
            )
        starts.append(len(prompt))
    spans = []
    for n, (i, start) in enumerate(zip(turns, starts, strict=True)):
        limit = starts[n + 1] if n + 1 < len(starts) else len(full)
        content = str(messages[i]["content"]).strip()
        at = full.find(content, start, limit)
        if at < 0:
            raise ChatTemplateMaskError(
                f"the chat template rewrites the content of assistant turn {i}, so its tokens cannot be found; "
                "give the template {% generation %} tags around each assistant turn"
            )
        end = at + len(content)
        found = [(full.find(s, end, limit), s) for s in stops]
        found = [(pos, s) for pos, s in found if pos >= 0]
        if found:
            pos, stop = min(found)
            end = pos + len(stop)
        spans.append((start, end))
    return full, spans


def assistant_mask(tokenizer, messages: list[dict[str, Any]], eos_token_ids: Sequence[int] = (),
                   truncated: Sequence[bool] = ()) -> tuple[list[int], list[int]]:
    """(input ids, 1 for every assistant token) of `messages` rendered by the tokenizer's chat template.

    `truncated[n]` says assistant turn n was cut at a length limit (synthesis records it): the stop token the
    template closes it with was never the model's choice, so it is left out of the mask."""
    stops = stop_tokens(tokenizer, eos_token_ids)
    if has_generation_tags(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
    else:
        full, spans = assistant_spans(tokenizer, messages, stops)
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = [int(any(tok_end > start and tok_start < end for start, end in spans))
                for tok_start, tok_end in encoded["offset_mapping"]]
    if any(truncated):
        _unmask_forced_stops(ids, mask, truncated, set(tokenizer.convert_tokens_to_ids(stops)))
    return ids, mask


def _unmask_forced_stops(ids: list[int], mask: list[int], truncated: Sequence[bool], stop_ids: set[int]) -> None:
    """Clear the trailing stop tokens of each truncated turn's run of masked tokens (runs are turns, in order)."""
    runs, start = [], None
    for i, keep in enumerate([*mask, 0]):
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            runs.append((start, i))
            start = None
    for (begin, end), cut in zip(runs, truncated, strict=False):
        position = end - 1
        while cut and position >= begin and ids[position] in stop_ids:
            mask[position] = 0
            position -= 1
