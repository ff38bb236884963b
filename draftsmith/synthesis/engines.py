"""Chat engines that answer the requests of one synthesis round: an in-process vLLM engine, or an OpenAI-compatible
endpoint. Each lives in a Ray Data actor for the whole job (see synthesize.py), so a vLLM engine starts once per
actor, not once per round.

A request is {key, messages, max_tokens, seed}; `answer` returns one result {key, text, generated_tokens,
finish_reason, error} per request (error is "" on success): a failed request is reported, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from draftsmith.engines.vllm_args import engine_args, engine_env
from draftsmith.engines.vllm_cpu import compute_threads, share_of_cores
from draftsmith.recipe.schema import OpenAIEndpoint, SynthesisSettings, VllmSettings

log = logging.getLogger(__name__)


class ChatEngine(Protocol):
    def answer(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer every request; a failed request gets a result with `error` set instead of raising."""

    def close(self) -> None:
        """Free the engine (its processes, its connections)."""


def _failed(key: str, error: str) -> dict[str, Any]:
    return {"key": key, "text": "", "generated_tokens": 0, "finish_reason": "error", "error": error}


class VLLMChatEngine:
    """vLLM's offline engine (GPU, or the CPU build), started once and kept for every round of the job."""

    def __init__(self, model_dir: Path, settings: SynthesisSettings, max_model_len: int,
                 vllm: VllmSettings | None = None):
        from vllm import LLM

        os.environ.update(engine_env(vllm))  # this actor's process is the engine's
        # On CPU the actors share the cores; this one's engine computes in this process (vllm.in_process) or in a
        # worker process that reads OMP_NUM_THREADS.
        self.threads = None if settings.use_gpu else share_of_cores(settings.concurrency)
        if self.threads is not None:
            compute_threads(self.threads)
        kwargs = engine_args(vllm, "gpu" if settings.use_gpu else "cpu")
        if settings.quantized_base:
            kwargs["quantization"] = "modelopt"
        self.sampling = settings.sampling
        self.llm = LLM(model=str(model_dir), max_model_len=max_model_len, enable_prefix_caching=True, seed=0,
                       **kwargs)

    def _generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                 max_tokens=int(r["max_tokens"]), seed=int(r["seed"])) for r in requests]
        outputs = self.llm.chat([r["messages"] for r in requests], params, use_tqdm=False)
        results = []
        for request, output in zip(requests, outputs, strict=True):
            completion = output.outputs[0]
            results.append({"key": request["key"], "text": completion.text,
                            "generated_tokens": len(completion.token_ids),
                            "finish_reason": "length" if completion.finish_reason == "length" else "stop",
                            "error": ""})
        return results

    def answer(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.threads is not None:
            compute_threads(self.threads)  # Ray calls the actor in another thread than the one that built it
        try:
            return self._generate(requests)
        except (ValueError, RuntimeError, TypeError) as exc:
            if len(requests) == 1:
                return [_failed(requests[0]["key"], f"{type(exc).__name__}: {exc}")]
            # vLLM refuses a whole batch for one bad request: ask one by one, so only that one is quarantined.
            log.warning("a batch of %d requests failed (%s); answering them one by one", len(requests), exc)
            return [result for request in requests for result in self.answer([request])]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


class OpenAIChatEngine:
    """Any OpenAI-compatible endpoint (vllm serve, trtllm-serve, draftsmith's own Serve app): an async client with
    a concurrency limit, retrying 429, 5xx and connection errors with jittered exponential backoff."""

    def __init__(self, settings: SynthesisSettings, model: str, api_key: str | None):
        o = settings.openai
        self.base_url, self.timeout_s, self.max_concurrency = o.base_url.rstrip("/"), o.timeout_s, o.max_concurrency
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.max_retries = model, o.max_retries
        self.sampling = {"temperature": settings.sampling.temperature, "top_p": settings.sampling.top_p}

    async def _one(self, client, limit: asyncio.Semaphore, request: dict[str, Any]) -> dict[str, Any]:
        import httpx

        body = {"model": self.model, "messages": request["messages"], "max_tokens": int(request["max_tokens"]),
                "seed": int(request["seed"]), **self.sampling}
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                async with limit:
                    resp = await client.post("/chat/completions", json=body)
                if resp.status_code == 200:
                    data = resp.json()
                    choice = data["choices"][0]
                    return {"key": request["key"], "text": choice["message"]["content"] or "",
                            "generated_tokens": int(data.get("usage", {}).get("completion_tokens", 0)),
                            "finish_reason": choice.get("finish_reason") or "stop", "error": ""}
                error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code < 500 and resp.status_code != 429:
                    break  # the request itself is wrong: retrying will not help
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < self.max_retries:
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        return _failed(request["key"], error)

    async def _all(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import httpx

        limit = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout_s) as client:
            return list(await asyncio.gather(*(self._one(client, limit, r) for r in requests)))

    def answer(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return asyncio.run(self._all(requests))

    def close(self) -> None:
        pass


def check_endpoint(settings: OpenAIEndpoint, timeout_s: float = 10.0) -> None:
    """SynthesisError (one line) unless the endpoint answers `GET /models`: down, unreachable or refusing the key."""
    from draftsmith.synthesis.synthesize import SynthesisError

    request = urllib.request.Request(settings.base_url.rstrip("/") + "/models")
    api_key = os.environ.get(settings.api_key_env)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        hint = f" (is ${settings.api_key_env} the right key?)" if exc.code in (401, 403) else ""
        raise SynthesisError(f"synthesis.openai.base_url={settings.base_url}: GET /models answered HTTP "
                             f"{exc.code}{hint}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SynthesisError(f"synthesis.openai.base_url={settings.base_url} is unreachable ({reason}); start the "
                             "endpoint or fix the URL") from None


def resolve_openai_model(base_url: str, api_key: str | None, timeout_s: float = 10.0) -> str:
    """The first model an OpenAI-compatible endpoint lists, for when the recipe names none."""
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            models = json.loads(resp.read())["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot list models at {base_url}/models ({exc}); check synthesis.openai.base_url "
                         "or name the model in synthesis.openai.model") from None
    if not models:
        raise ValueError(f"{base_url}/models lists no model; name one in synthesis.openai.model")
    return models[0]["id"]


class EngineSpec:
    """What a Ray Data actor needs to build its engine; made on the driver, so a bad endpoint or a missing model
    name fails there, before any actor starts."""

    def __init__(self, settings: SynthesisSettings, model_dir: Path, max_model_len: int,
                 vllm: VllmSettings | None = None):
        if settings.engine not in ("vllm", "openai"):
            raise ValueError(f"unknown synthesis engine {settings.engine!r}; valid: vllm, openai")
        self.settings, self.model_dir, self.max_model_len = settings, Path(model_dir), max_model_len
        self.vllm = vllm
        self.api_key = os.environ.get(settings.openai.api_key_env) if settings.engine == "openai" else None
        self.openai_model = None
        if settings.engine == "openai":
            self.openai_model = settings.openai.model or resolve_openai_model(settings.openai.base_url, self.api_key)

    def actor_resources(self) -> dict[str, float]:
        """Ray resources of one engine actor: a GPU, one CPU for a CPU engine, little for an HTTP client."""
        if self.settings.engine == "openai":
            return {"num_cpus": 0.25}  # I/O bound: leave the cores to the endpoint when it runs on this machine
        return {"num_cpus": 1, "num_gpus": 1} if self.settings.use_gpu else {"num_cpus": 1}

    def build(self) -> ChatEngine:
        if self.settings.engine == "vllm":
            return VLLMChatEngine(self.model_dir, self.settings, self.max_model_len, self.vllm)
        return OpenAIChatEngine(self.settings, self.openai_model, self.api_key)
