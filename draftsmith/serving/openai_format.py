"""OpenAI response bodies for engines that do not produce them (TensorRT-LLM's LLM API returns token streams)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

CHAT, COMPLETIONS = "chat", "completions"


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(kind: str, index: int, text: str, finish_reason: str | None, stream: bool) -> dict[str, Any]:
    if kind == COMPLETIONS:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {"role": "assistant", "content": text} if not stream else ({"content": text} if text else {})
    return {"index": index, ("delta" if stream else "message"): body, "logprobs": None,
            "finish_reason": finish_reason}


def response(kind: str, request_id: str, model: str, choices: list[dict[str, Any]], created: int | None = None,
             usage_: dict[str, int] | None = None, stream: bool = False) -> dict[str, Any]:
    objects = {(CHAT, False): "chat.completion", (CHAT, True): "chat.completion.chunk",
               (COMPLETIONS, False): "text_completion", (COMPLETIONS, True): "text_completion"}
    return {"id": request_id, "object": objects[(kind, stream)], "created": created or int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def finish_reason(engine_reason: str | None) -> str | None:
    """TensorRT-LLM's finish reasons in OpenAI's words."""
    return {"length": "length", "stop": "stop", "end_id": "stop", "stop_words": "stop"}.get(engine_reason or "",
                                                                                         engine_reason)
