"""Engines that answer one round of chat requests as a Ray Data pass: vLLM actors or an OpenAI-compatible endpoint.

A request row is {key, messages, max_tokens, seed}; every engine yields result rows
{key, text, generated_tokens, finish_reason, error} (error is "" on success), one per request, in any order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import ray

from draftsmith.engines.vllm_cpu import cpu_engine_kwargs
from draftsmith.recipe.schema import SynthesisSettings

log = logging.getLogger(__name__)


class RoundEngine(Protocol):
    def answer(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Answer every request; a failed request yields a row with `error` set instead of raising."""


class VLLMRoundEngine:
    """vLLM engines on a Ray Data actor pool through `ray.data.llm` (GPU, or CPU with one-CPU bundles)."""

    def __init__(self, model_dir: Path, settings: SynthesisSettings, max_model_len: int):
        self.model_dir, self.settings, self.max_model_len = str(model_dir), settings, max_model_len

    def answer(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        s = self.settings
        engine_kwargs: dict[str, Any] = {"max_model_len": self.max_model_len, "enable_prefix_caching": True}
        if not s.use_gpu:
            engine_kwargs.update(cpu_engine_kwargs())
        if s.quantized_base:
            engine_kwargs["quantization"] = "modelopt"
        config = vLLMEngineProcessorConfig(
            model_source=self.model_dir,
            engine_kwargs=engine_kwargs,
            concurrency=s.concurrency,
            batch_size=s.batch_size,
            accelerator_type=None,
            # On CPU an engine actor is one CPU bundle; on GPU ray.data.llm's default is one GPU per engine.
            **({} if s.use_gpu else {"placement_group_config": {"bundles": [{"CPU": 1}]}}),
            should_continue_on_error=True,  # one bad request is quarantined, not the whole round
            log_engine_metrics=False,
        )
        sampling = {"temperature": s.sampling.temperature, "top_p": s.sampling.top_p}
        processor = build_processor(
            config,
            preprocess=lambda row: {
                "key": row["key"], "max_tokens": row["max_tokens"], "messages": row["messages"],
                "sampling_params": {**sampling, "max_tokens": row["max_tokens"], "seed": row["seed"]},
            },
            postprocess=lambda row: {
                "key": row["key"],
                "text": row.get("generated_text") or "",
                "generated_tokens": int(row.get("num_generated_tokens") or 0),
                "finish_reason": "length" if int(row.get("num_generated_tokens") or 0) >= row["max_tokens"]
                else "stop",
                "error": str(row.get("__inference_error__") or ""),
            },
        )
        yield from processor(ray.data.from_items(requests)).iter_rows()


class _OpenAIClientPool:
    """Ray Data actor: an async HTTP client answering a batch concurrently, with retries and backoff."""

    def __init__(self, base_url: str, model: str, api_key: str | None, max_concurrency: int, max_retries: int,
                 timeout_s: float, temperature: float, top_p: float):
        self.base_url, self.timeout_s, self.max_concurrency = base_url.rstrip("/"), timeout_s, max_concurrency
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.max_retries = model, max_retries
        self.sampling = {"temperature": temperature, "top_p": top_p}
        self.client = self.limit = None  # made inside Ray Data's event loop, which runs async UDFs

    async def _one(self, request: dict[str, Any]) -> dict[str, Any]:
        import httpx

        body = {"model": self.model, "messages": request["messages"], "max_tokens": int(request["max_tokens"]),
                "seed": int(request["seed"]), **self.sampling}
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                async with self.limit:
                    resp = await self.client.post("/chat/completions", json=body)
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
            await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        return {"key": request["key"], "text": "", "generated_tokens": 0, "finish_reason": "error",
                "error": error}

    async def __call__(self, batch: dict[str, Any]):
        import httpx

        if self.client is None:
            self.client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout_s)
            self.limit = asyncio.Semaphore(self.max_concurrency)
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for row in rows:  # Arrow hands back numpy arrays of structs; the client wants plain lists
            row["messages"] = [dict(m) for m in row["messages"]]
        results = await asyncio.gather(*(self._one(r) for r in rows))
        if results:
            yield {key: [r[key] for r in results] for key in results[0]}


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


class OpenAIRoundEngine:
    """Any OpenAI-compatible endpoint (vllm serve, trtllm-serve, draftsmith's own Serve app)."""

    def __init__(self, settings: SynthesisSettings):
        self.settings = settings
        self.api_key = os.environ.get(settings.openai.api_key_env)
        self.model = settings.openai.model or resolve_openai_model(settings.openai.base_url, self.api_key)

    def answer(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        o, s = self.settings.openai, self.settings.sampling
        ds = ray.data.from_items(requests).map_batches(
            _OpenAIClientPool,
            fn_constructor_kwargs=dict(base_url=o.base_url, model=self.model, api_key=self.api_key,
                                       max_concurrency=o.max_concurrency, max_retries=o.max_retries,
                                       timeout_s=o.timeout_s, temperature=s.temperature, top_p=s.top_p),
            batch_size=self.settings.batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.settings.concurrency),
            num_cpus=0.25,  # I/O bound: leave the cores to the endpoint when it runs on this machine
        )
        yield from ds.iter_rows()


def make_engine(settings: SynthesisSettings, model_dir: Path, max_model_len: int) -> RoundEngine:
    if settings.engine == "vllm":
        return VLLMRoundEngine(model_dir, settings, max_model_len)
    if settings.engine == "openai":
        return OpenAIRoundEngine(settings)
    raise ValueError(f"unknown synthesis engine {settings.engine!r}; valid: vllm, openai")
