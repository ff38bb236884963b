"""The OpenAI-compatible ingress: auth, limits, metrics and retries in front of the engine deployments.

A FastAPI app on Ray Serve that forwards JSON: it imports no engine (neither vLLM nor TensorRT-LLM, nor Ray Serve
LLM's OpenAI models, which import vLLM), so it starts in seconds and runs where only one engine is installed.
The engine replicas parse requests into their own types (`admit`, then `chat` / `completions` on plain dicts) and
answer in plain JSON. The routes take the raw request, so that an unauthenticated or oversized request is refused
before its body is parsed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import JSONResponse, Response, StreamingResponse

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.auth import load_api_key
from draftsmith.serving.errors import APIError, invalid
from draftsmith.serving.limits import CHAT, check_prompt_tokens, check_request, parse_body
from draftsmith.serving.metrics import ServeMetrics
from draftsmith.serving.retry import retry_attempts
from draftsmith.serving.stream import StreamAccount

log = logging.getLogger(__name__)

app = FastAPI(title="draftsmith", docs_url=None, redoc_url=None)


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


def engine_error(item: Any) -> dict[str, Any] | None:
    """The error body an engine answered instead of a result (`{"error": {...}}`, alone or first in a batch)."""
    if isinstance(item, list) and item:
        item = item[0]
    if isinstance(item, dict) and isinstance(item.get("error"), dict) and not item.get("choices"):
        return item["error"]
    return None


@serve.ingress(app)
class DraftsmithIngress:
    def __init__(self, engines: dict[str, Any], *, serving: dict[str, Any], stats_board):
        self.engines = engines  # model id -> the engine deployment's handle
        self.settings = ServingSettings.model_validate(serving)
        self.api_key = load_api_key(self.settings)
        self.metrics = ServeMetrics()
        self.stats_board = stats_board
        self._created = int(time.time())
        log.info("ingress for %s, API key required: %s", sorted(engines), self.api_key.required)

    # ------------------------------------------------------------------------------------------- routes
    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self.api_key.check(request.headers.get("authorization"))
        except APIError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [await self._card(m) for m in self.engines]})

    @app.get("/v1/models/{model:path}")
    async def model_data(self, model: str, request: Request) -> Response:
        try:
            self.api_key.check(request.headers.get("authorization"))
            if model not in self.engines:
                raise self._unknown_model(model)
        except APIError as error:
            return error_response(error)
        return JSONResponse(await self._card(model))

    @app.get("/health")
    async def health(self) -> Response:
        """200 once every model has an engine replica reporting; 503 while none does (starting, replaced)."""
        reports = await self.stats_board.snapshot.remote()
        serving = {r["model"] for r in reports.values()}
        missing = sorted(set(self.engines) - serving)
        status = 503 if missing else 200
        return JSONResponse({"status": "unavailable" if missing else "ok", "models_without_engine": missing,
                             "engine_replicas": len(reports)}, status_code=status)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        body = self.metrics.render(await self.stats_board.snapshot.remote())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------ helpers
    def _unknown_model(self, model: str) -> APIError:
        return APIError(404, f"model {model!r} is not served here; GET /v1/models lists {sorted(self.engines)}",
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
        if model is None and len(self.engines) == 1:
            return next(iter(self.engines))
        if not isinstance(model, str):
            raise invalid("model is required (GET /v1/models lists the served models)", "model", "missing")
        if model not in self.engines:
            raise self._unknown_model(model)
        return model

    async def _call_engine(self, model: str, method: str, payload: dict[str, Any]):
        """(first item, stream) of an engine call; sent again while the engine fails before answering."""
        last: Any = None
        async for attempt in retry_attempts(self.settings.engine_retry_s):
            stream = getattr(self.engines[model].options(stream=True), method).remote(payload)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                last = "the engine closed the stream without an answer"
                continue
            except Exception as exc:  # a dead engine or replica: Serve routes the retry elsewhere
                last = exc
                log.warning("engine call %s failed (attempt %d): %s", method, attempt + 1, exc)
                continue
            error = engine_error(first)
            code = error.get("code") if error else None
            if isinstance(code, int) and code >= 500:
                last = error.get("message")
                log.warning("engine call %s answered %d (attempt %d): %s", method, code, attempt + 1, last)
                continue
            return first, stream
        raise APIError(503, f"the engine could not answer: {last}", type="service_unavailable",
                       code="engine_unavailable")

    async def _admit(self, model: str, kind: str, body: dict[str, Any]) -> int:
        """The prompt's length in the model's tokens, from an engine replica (it holds the tokenizer and the
        engine's request types); the replica's 4xx for a body it cannot take is raised as is."""
        last: Exception | None = None
        async for _ in retry_attempts(self.settings.engine_retry_s):
            try:
                admitted = await self.engines[model].admit.remote(kind, body)
            except Exception as exc:  # a dead engine or replica: Serve routes the retry elsewhere
                last = exc
                continue
            if "error" in admitted:
                error = admitted["error"]
                raise APIError(admitted["status"], error["message"], param=error.get("param"),
                               code=error.get("code"), type=error.get("type"))
            return admitted["prompt_tokens"]
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
            prompt_tokens = await self._admit(model, kind, body)
            check_prompt_tokens(prompt_tokens, self.settings)
            first, stream = await self._call_engine(model, kind, {**body, "model": model})
            if (error := engine_error(first)) is not None:
                code = error.get("code")
                raise APIError(code if isinstance(code, int) else 500, str(error.get("message")),
                               type=error.get("type"))
        except APIError as error:
            self.metrics.record_error(model, kind, error.status, error.type)
            return error_response(error)
        if not body.get("stream"):
            answer = first
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
