"""Request limits checked at the ingress, before a request reaches an engine.

Each out-of-range value gets a 400 naming the field (`param`), the allowed range and how to fix it.
"""

from __future__ import annotations

import json
from typing import Any

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.errors import APIError, invalid

CHAT, COMPLETIONS = "chat", "completions"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit


def parse_body(raw: bytes, settings: ServingSettings) -> dict[str, Any]:
    if len(raw) > settings.max_body_bytes:
        raise APIError(400, f"request body is {len(raw)} bytes; this endpoint accepts at most "
                            f"{settings.max_body_bytes}", code="body_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", code="invalid_json")
    return body


def _int(body: dict[str, Any], key: str, low: int, high: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer, got {value!r}", key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{key} is {value}; it must be {bound} on this endpoint", key)
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key} must be a number, got {value!r}", key)
    if value > high or value < low or (low_open and value == low):
        raise invalid(f"{key} is {value}; it must be in {'(' if low_open else '['}{low}, {high}]", key)


def check_request(body: dict[str, Any], kind: str, settings: ServingSettings) -> dict[str, Any]:
    """The body with its limits checked and `max_tokens` defaulted to the endpoint's limit (bounded work)."""
    if kind == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages must be a non-empty list of {role, content} objects", "messages", "missing")
    else:
        prompt = body.get("prompt")
        if not prompt or not isinstance(prompt, str | list):
            raise invalid("prompt must be a non-empty string (or list of strings)", "prompt", "missing")
    for key in ("max_tokens", "max_completion_tokens"):
        _int(body, key, 1, settings.max_tokens_limit)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body = {**body, "max_tokens": settings.max_tokens_limit}
    _int(body, "n", 1, settings.max_n)
    _int(body, "seed", -(2**63), 2**63 - 1)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0, low_open=True)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("stop must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream must be true or false", "stream")
    return body


def check_prompt_tokens(count: int, settings: ServingSettings) -> None:
    if count > settings.max_prompt_tokens:
        raise invalid(f"the prompt is {count} tokens; this endpoint accepts at most {settings.max_prompt_tokens} "
                      "(shorten the conversation)", "messages", "context_length_exceeded")


def prompt_token_ids(tokenizer, kind: str, body: dict[str, Any]) -> list[int]:
    """The prompt as the engine will see it: the chat template with the generation prompt, or the raw prompt."""
    if kind == CHAT:
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    prompt = body["prompt"]
    if isinstance(prompt, list):  # token ids, or a batch of prompts: the longest one counts
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return max((prompt_token_ids(tokenizer, kind, {"prompt": p}) for p in prompt), key=len)
    return tokenizer(prompt)["input_ids"]
