"""Server-sent events from the engines, passed on to the client and accounted on the way.

The ingress asks every streaming request for usage (`stream_options.include_usage`) so it can count tokens
exactly (a speculative step streams several tokens in one chunk); the usage event is dropped again for clients
that did not ask for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"


def as_events(response: Any) -> list[str]:
    """An engine's stream item (an SSE string, a dict, a pydantic chunk, or a batch of them) as SSE events."""
    if isinstance(response, list):
        return [event for item in response for event in as_events(item)]
    if isinstance(response, str):
        return [f"{part.strip()}\n\n" for part in response.split("\n\n") if part.strip()]
    if isinstance(response, dict):
        return [f"data: {json.dumps(response)}\n\n"]
    if hasattr(response, "model_dump_json"):
        return [f"data: {response.model_dump_json()}\n\n"]
    raise TypeError(f"unexpected stream item from the engine: {type(response).__name__}")


def _has_output(payload: dict[str, Any]) -> bool:
    for choice in payload.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


@dataclass
class StreamAccount:
    """What went by in one streamed response."""

    started: float
    client_wants_usage: bool
    first_token_at: float | None = None
    last_token_at: float | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    done: bool = False

    def relay(self, response: Any) -> str:
        """The SSE text to send on for one engine item (usage events stripped unless asked for)."""
        out = []
        now = time.perf_counter()
        for event in as_events(response):
            data = event.removeprefix("data:").strip()
            if data == "[DONE]":
                self.done = True
                out.append(DONE)
                continue
            try:
                payload = json.loads(data)
            except json.JSONDecodeError:
                out.append(event)
                continue
            if "error" in payload and not payload.get("choices"):
                self.error = payload["error"] if isinstance(payload["error"], dict) else {"message": payload["error"]}
            if _has_output(payload):
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
            if payload.get("usage"):
                self.usage = payload["usage"]
                if not self.client_wants_usage:
                    if not payload.get("choices"):
                        continue  # the usage-only event the ingress asked for
                    payload["usage"] = None
                    event = f"data: {json.dumps(payload)}\n\n"
            out.append(event)
        return "".join(out)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def last_token(self) -> float | None:
        return None if self.last_token_at is None else self.last_token_at - self.started
