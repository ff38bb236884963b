"""Request limits checked at the ingress, before a request reaches an engine, and the admission an engine replica
answers before it generates (`admit`: the engine's request type and the prompt's length in its tokens).

Each out-of-range value gets a 400 naming the field (`param`), the allowed range and how to fix it.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from pydantic import BaseModel, ValidationError

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.errors import APIError, invalid

CHAT, COMPLETIONS = "chat", "completions"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; vLLM reads -1 as "the whole vocabulary", per token

# What the endpoint accepts. The engine's request types take many more (vLLM's guided decoding, logits
# processors, prompt_logprobs=-1, ...), each a way to make one request cost what a thousand should: a field not
# listed here gets a 400 naming it rather than passing through unchecked.
_COMMON = {"model", "max_tokens", "n", "seed", "temperature", "top_p", "top_k", "min_p", "stop", "stream",
           "stream_options", "user", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
           "prompt_logprobs", "logprobs", "ignore_eos"}
ACCEPTED = {CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
            COMPLETIONS: _COMMON | {"prompt", "echo"}}


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
    unknown = sorted(set(body) - ACCEPTED[kind])
    if unknown:
        raise invalid(f"{unknown[0]} is not supported by this endpoint (it accepts {', '.join(sorted(ACCEPTED[kind]))})",
                      unknown[0], "unsupported_parameter")
    prompts = 1
    if kind == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages must be a non-empty list of {role, content} objects", "messages", "missing")
    else:
        prompt = body.get("prompt")
        if not prompt or not isinstance(prompt, str | list):
            raise invalid("prompt must be a non-empty string (or list of strings)", "prompt", "missing")
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = len(prompt)  # a batch of prompts, each generating n completions
    for key in ("max_tokens", "max_completion_tokens"):
        _int(body, key, 1, settings.max_tokens_limit)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body = {**body, "max_tokens": settings.max_tokens_limit}
    n = _int(body, "n", 1, settings.max_n) or 1
    if prompts * n > settings.max_n:
        raise invalid(f"prompt is a batch of {prompts} prompts with n={n}: {prompts * n} completions; this endpoint "
                      f"generates at most {settings.max_n} per request (send several requests)", "prompt")
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    _int(body, "min_tokens", 0, max_tokens)
    _int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    _int(body, "top_k", -1, None)
    if kind == CHAT:
        if not isinstance(body.get("logprobs", False), bool):
            raise invalid("logprobs must be true or false (top_logprobs says how many)", "logprobs")
    else:
        _int(body, "logprobs", 0, MAX_LOGPROBS)
        if not isinstance(body.get("echo", False), bool):
            raise invalid("echo must be true or false", "echo")
    for key, low, high in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                           ("repetition_penalty", 0.0, 2.0), ("min_p", 0.0, 1.0)):
        _number(body, key, low, high, low_open=key == "repetition_penalty")
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
    for flag in ("stream", "ignore_eos"):  # ignore_eos costs no more than max_tokens, which is bounded
        if not isinstance(body.get(flag, False), bool):
            raise invalid(f"{flag} must be true or false", flag)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options may only hold include_usage", "stream_options")
    if not isinstance(body.get("user", ""), str) or not isinstance(body.get("model", ""), str):
        raise invalid("user and model must be strings", "user" if not isinstance(body.get("user", ""), str)
                      else "model")
    return body


def parse_request(request_type: type[BaseModel], body: dict[str, Any], model: str) -> Any:
    """The checked body as the engine's request type; its first validation problem is a 400 naming the field."""
    try:
        return request_type.model_validate({**body, "model": model})
    except ValidationError as exc:
        first_error = exc.errors()[0]
        param = ".".join(str(p) for p in first_error.get("loc", ())) or None
        raise invalid(f"{param}: {first_error.get('msg')}", param) from None


def check_prompt_tokens(count: int, settings: ServingSettings) -> None:
    if count > settings.max_prompt_tokens:
        raise invalid(f"the prompt is {count} tokens; this endpoint accepts at most {settings.max_prompt_tokens} "
                      "(shorten the conversation)", "messages", "context_length_exceeded")


def prompt_token_ids(tokenizer, kind: str, body: dict[str, Any]) -> list[int]:
    """The prompt as the engine will see it: the chat template with the generation prompt, or the raw prompt."""
    if kind == CHAT:
        try:
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        except (jinja2.TemplateError, AttributeError, IndexError) as exc:
            # The template met messages it cannot render (a raise_exception in it, a turn of the wrong shape):
            # the request's fault, reported as such (ValueError is what the ingress turns into a 400).
            raise ValueError(f"the chat template cannot render these messages ({exc})") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    prompt = body["prompt"]
    if isinstance(prompt, list):  # token ids, or a batch of prompts: the longest one counts
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return max((prompt_token_ids(tokenizer, kind, {"prompt": p}) for p in prompt), key=len)
    return tokenizer(prompt)["input_ids"]


def admit(tokenizer, kind: str, body: dict[str, Any], request_type: type[BaseModel] | None = None,
          model: str | None = None) -> dict[str, Any]:
    """An engine replica's answer to the ingress before it generates (the replica holds the tokenizer and, for
    vLLM, the request types): `{"prompt_tokens": n}`, or a refusal `{"status": 4xx, "error": {...}}` naming the
    field, for a body the engine's request type or the chat template cannot take. Plain JSON either way: the
    ingress imports no engine."""
    try:
        if request_type is not None:
            parse_request(request_type, body, model)
        try:
            count = len(prompt_token_ids(tokenizer, kind, body))
        except (ValueError, TypeError, KeyError) as exc:
            raise invalid(f"cannot tokenize the prompt: {exc}", "messages" if kind == CHAT else "prompt") from None
    except APIError as error:
        return {"status": error.status, **error.body()}
    return {"prompt_tokens": count}
