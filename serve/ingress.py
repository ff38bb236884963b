"""The OpenAI-compatible ingress: auth, limits, metrics and retries in front of the engine deployments.

It extends Ray Serve LLM's `OpenAiIngress` (model handles, routing); the routes take the raw request so that an
unauthenticated or oversized request is refused before its body is parsed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest, CompletionRequest, ErrorResponse)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response, StreamingResponse

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.auth import load_api_key
from draftsmith.serving.errors import APIError, invalid
from draftsmith.serving.limits import CHAT, check_prompt_tokens, check_request, parse_body, parse_request
from draftsmith.serving.metrics import ServeMetrics
from draftsmith.serving.retry import retry_attempts
from draftsmith.serving.stream import StreamAccount

log = logging.getLogger(__name__)

ENDPOINTS = {
    "chat": lambda app: app.post("/v1/chat/completions"),
    "completions": lambda app: app.post("/v1/completions"),
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "health": lambda app: app.get("/health"),
    "metrics": lambda app: app.get("/metrics"),
}
REQUEST_TYPES = {CHAT: ChatCompletionRequest, "completions": CompletionRequest}


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (a declared length is checked before reading)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(400, f"request body is {declared} bytes; this endpoint accepts at most {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(400, f"request body is over {limit} bytes, the most this endpoint accepts",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class DraftsmithIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, serving: dict[str, Any], stats_board):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.settings = ServingSettings.model_validate(serving)
        self.api_key = load_api_key(self.settings)
        self.metrics = ServeMetrics()
        self.stats_board = stats_board
        self._created = int(time.time())
        log.info("ingress for %s, API key required: %s", sorted(model_cards), self.api_key.required)

    # ------------------------------------------------------------------------------------------- routes
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def models(self, request: Request) -> Response:
        try:
            self.api_key.check(request.headers.get("authorization"))
        except APIError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [await self._card(m) for m in self._model_cards]})

    async def model_data(self, model: str, request: Request) -> Response:
        try:
            self.api_key.check(request.headers.get("authorization"))
            if model not in self._model_cards:
                raise self._unknown_model(model)
        except APIError as error:
            return error_response(error)
        return JSONResponse(await self._card(model))

    async def health(self) -> Response:
        """200 once every model has an engine replica reporting; 503 while none does (starting, replaced)."""
        reports = await self.stats_board.snapshot.remote()
        serving = {r["model"] for r in reports.values()}
        missing = sorted(set(self._model_cards) - serving)
        status = 503 if missing else 200
        return JSONResponse({"status": "unavailable" if missing else "ok", "models_without_engine": missing,
                             "engine_replicas": len(reports)}, status_code=status)

    async def metrics(self) -> Response:
        body = self.metrics.render(await self.stats_board.snapshot.remote())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------ helpers
    def _unknown_model(self, model: str) -> APIError:
        return APIError(404, f"model {model!r} is not served here; GET /v1/models lists {sorted(self._model_cards)}",
                        param="model", code="model_not_found")

    async def _card(self, model: str) -> dict[str, Any]:
        reports = await self.stats_board.snapshot.remote()
        versions = sorted({str(r.get("model_version")) for r in reports.values() if r["model"] == model})
        engine = next((r for r in reports.values() if r["model"] == model), {})
        return {"id": model, "object": "model", "created": self._created,
                "owned_by": "draftsmith",
                "metadata": {"model_ref": self.settings.model_ref, "engine": self.settings.engine,
                             "speculative": self.settings.speculative, "serving_versions": versions,
                             **{k: engine.get(k) for k in ("algorithm", "quantization", "max_draft_len")}}}

    def _model_id(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None and len(self._model_cards) == 1:
            return next(iter(self._model_cards))
        if not isinstance(model, str):
            raise invalid("model is required (GET /v1/models lists the served models)", "model", "missing")
        if model not in self._model_cards:
            raise self._unknown_model(model)
        return model

    async def _call_engine(self, model: str, method: str, payload):
        """(first item, stream) of an engine call; sent again while the engine fails before answering."""
        last: Any = None
        async for attempt in retry_attempts(self.settings.engine_retry_s):
            if self.settings.engine != "vllm":  # other engines take plain dicts (no vLLM protocol classes there)
                payload = payload.model_dump(exclude_none=True) if hasattr(payload, "model_dump") else payload
            stream = getattr(self._get_configured_serve_handle(model), method).remote(payload, None)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                last = "the engine closed the stream without an answer"
                continue
            except Exception as exc:  # a dead engine or replica: Serve routes the retry elsewhere
                last = exc
                log.warning("engine call %s failed (attempt %d): %s", method, attempt + 1, exc)
                continue
            if isinstance(first, list) and first and isinstance(first[0], ErrorResponse):
                first = first[0]
            if isinstance(first, ErrorResponse) and first.error.code >= 500:
                last = first.error.message
                log.warning("engine call %s answered %d (attempt %d): %s", method, first.error.code, attempt + 1,
                            last)
                continue
            return first, stream
        raise APIError(503, f"the engine could not answer: {last}", type="service_unavailable",
                       code="engine_unavailable")

    async def _prompt_tokens(self, model: str, kind: str, body: dict[str, Any]) -> int:
        """The prompt's length in the model's tokens, counted by an engine replica (it holds the tokenizer)."""
        last: Exception | None = None
        async for _ in retry_attempts(self.settings.engine_retry_s):
            try:
                return await self._default_serve_handles[model].prompt_tokens.remote(kind, body)
            except (ValueError, TypeError, KeyError) as exc:  # the replica could not read the prompt
                raise invalid(f"cannot tokenize the prompt: {exc}", "messages" if kind == CHAT else "prompt") from None
            except Exception as exc:
                last = exc
        raise APIError(503, f"the engine could not answer: {last}", type="service_unavailable",
                       code="engine_unavailable")

    async def _generate(self, request: Request, kind: str) -> Response:
        started = time.perf_counter()
        model = "unknown"
        try:
            self.api_key.check(request.headers.get("authorization"))
            body = check_request(parse_body(await read_body(request, self.settings.max_body_bytes), self.settings),
                                 kind, self.settings)
            model = self._model_id(body)
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if body.get("stream"):
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            parsed = parse_request(REQUEST_TYPES[kind], body, model)
            prompt_tokens = await self._prompt_tokens(model, kind, body)
            check_prompt_tokens(prompt_tokens, self.settings)
            first, stream = await self._call_engine(model, kind, parsed)
            if isinstance(first, ErrorResponse):
                raise APIError(first.error.code, first.error.message, type=first.error.type)
        except APIError as error:
            self.metrics.record_error(model, kind, error.status, error.type)
            return error_response(error)
        if not body.get("stream"):
            answer = first.model_dump() if hasattr(first, "model_dump") else first
            usage = answer.get("usage") or {}
            self.metrics.record_success(model, kind, seconds=time.perf_counter() - started, ttft=None,
                                        prompt_tokens=usage.get("prompt_tokens", prompt_tokens),
                                        completion_tokens=usage.get("completion_tokens", 0))
            return JSONResponse(answer)
        account = StreamAccount(started, wants_usage)
        return StreamingResponse(self._relay(model, kind, first, stream, account), media_type="text/event-stream")

    async def _relay(self, model: str, kind: str, first, stream, account: StreamAccount):
        """Pass the engine's events on; a client that goes away cancels the engine request (frees its slot)."""
        finished = False
        try:
            yield account.relay(first)
            async for item in stream:
                yield account.relay(item)
            if not account.done:
                yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                stream.cancel()  # best effort; Serve also cancels the handle call when this task is cancelled
                self.metrics.record_error(model, kind, 499, "client_disconnected")
            elif account.error:
                code = account.error.get("code")
                self.metrics.record_error(model, kind, code if isinstance(code, int) else 500, "engine_error")
            else:
                usage = account.usage
                self.metrics.record_success(model, kind, seconds=time.perf_counter() - account.started,
                                            ttft=account.ttft, prompt_tokens=usage.get("prompt_tokens", 0),
                                            completion_tokens=usage.get("completion_tokens", 0),
                                            streamed_until_last=account.last_token)
