"""The vLLM engine deployment: Ray Serve LLM's LLMServer, with the model resolved on the replica.

Ray Serve LLM runs vLLM's AsyncLLM and its OpenAI layer; what draftsmith adds is where the model comes from (a
registered version downloaded to the replica, or an export folder), the draft as vLLM's `speculative_config`,
the engine's speculative-decoding counters for the ingress's metrics, and plain JSON at the handle: requests
arrive as dicts and are parsed into vLLM's types here, answers leave as dicts and SSE strings (the ingress has
no vLLM to unpickle vLLM's objects with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase, CallbackConfig
from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest, CompletionRequest, ErrorResponse)
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from transformers import AutoTokenizer

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.limits import CHAT, COMPLETIONS, admit
from draftsmith.engines.vllm_args import engine_args, engine_env
from draftsmith.engines.vllm_cpu import use_cores
from draftsmith.engines.vllm_metrics import engine_stats_snapshot
from draftsmith.serving.model_source import materialize, resolve_device
from serve.stats_board import start_reporting

log = logging.getLogger(__name__)

REQUEST_TYPES = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}


def plain(item: Any) -> Any:
    """An engine answer as plain JSON data: SSE strings as they are, vLLM's response and error objects as dicts."""
    if isinstance(item, list):
        return [plain(x) for x in item]
    if isinstance(item, ErrorResponse):
        error = item.error
        return {"error": {"message": error.message, "type": error.type, "code": error.code,
                          "param": getattr(error, "param", None)}}
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json")
    return item


def vllm_engine_kwargs(settings: ServingSettings, model, device: str) -> dict[str, Any]:
    from draftsmith.evaluation.measure import context_length

    kwargs: dict[str, Any] = {"tokenizer": str(model.base_dir), "disable_log_stats": False,
                              "max_model_len": settings.max_model_len or context_length(model.base_dir)}
    kwargs.update(engine_args(settings.vllm, device))
    speculative = model.vllm_speculative_config(settings, device)
    if speculative is not None:
        kwargs["speculative_config"] = speculative
    kwargs.update(settings.engine_kwargs)
    kwargs["trust_remote_code"] = settings.trust_remote_code  # only ever from the setting (engine_kwargs refuse it)
    return kwargs


class ModelIsLocal(CallbackBase):
    """Skips Ray Serve LLM's node initialization: a Ray task per node of the replica's placement group that
    downloads the model's files. The replica has the model on its own node by then (`materialize`, above the
    engine start), and the task's worker process, importing torch and transformers, cost tens of seconds of
    each replica start on 2 cores for nothing to fetch."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


class WorkerInCoreVLLMEngine(VLLMEngine):
    """Ray Serve LLM's vLLM engine with the model worker in the engine core's process (`vllm.in_process`).

    On CPU, Ray Serve LLM always asks vLLM for its multiprocess executor: a third process per replica (beside the
    replica and the engine core) that is spawned and imports torch and vLLM again before it loads a model, about a
    minute of each replica start on 2 cores for the embedded base. A one-worker engine needs none: this runs the
    worker in the core, as vLLM does by default for one GPU. Overridden through the engine class Ray Serve LLM
    takes by injection (`LLMServer(engine_cls=)`); the executor is chosen from the config right before the
    engine starts, so that is where it is set."""

    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        parallel = vllm_engine_config.parallel_config
        if parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
        return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)


class SpeculativeVLLMServer(LLMServer):
    """One engine replica: downloads the pinned version, then starts vLLM with the draft attached."""

    async def __init__(self, llm_config: LLMConfig, *, serving: dict[str, Any], stats_board=None):
        settings = ServingSettings.model_validate(serving)
        model = await asyncio.to_thread(materialize, settings)  # a download must not block the replica
        device = resolve_device(settings)
        # A fresh config: the one bound at build time caches an engine config made from the model reference.
        fields = llm_config.model_dump()
        fields["model_loading_config"]["model_source"] = str(model.base_dir)
        fields["engine_kwargs"] = vllm_engine_kwargs(settings, model, device)
        fields["callback_config"] = CallbackConfig(callback_class=ModelIsLocal)
        llm_config = LLMConfig.model_validate(fields)
        self.served_model = model
        self._tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
        log.info("serving %s (version %s) from %s with %s", model.model_id, model.version, model.base_dir,
                 llm_config.engine_kwargs.get("speculative_config"))
        # GPU replicas keep Ray Serve LLM's executor (Ray's, placed on the replica's GPU bundle).
        in_core = settings.vllm.in_process and device == "cpu"
        if device == "cpu":  # every core for the worker (see engine_env); the async engine keeps its core process
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = engine_env(None)["VLLM_CPU_NUM_OF_RESERVED_CPU"]
            use_cores(settings.replicas if settings.autoscaling is None else settings.autoscaling.max_replicas)
        await super().__init__(llm_config, engine_cls=WorkerInCoreVLLMEngine if in_core else None)
        if stats_board is not None:
            self._reporting = start_reporting(stats_board, self.engine_stats)

    async def engine_stats(self) -> dict[str, Any]:
        """vLLM's speculative-decoding counters and queue gauges in this replica (cumulative)."""
        return {"model": self.served_model.model_id, "model_version": self.served_model.version,
                **self.served_model.card(), **engine_stats_snapshot()}

    async def admit(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """The prompt's token count, or the 4xx for a body vLLM's request type or the chat template refuses."""
        return admit(self._tokenizer, kind, body, REQUEST_TYPES[kind], self.served_model.model_id)

    async def chat(self, request, raw_request_info=None) -> AsyncIterator[Any]:
        async for item in self._plain_answers(super().chat, CHAT, request, raw_request_info):
            yield item

    async def completions(self, request, raw_request_info=None) -> AsyncIterator[Any]:
        async for item in self._plain_answers(super().completions, COMPLETIONS, request, raw_request_info):
            yield item

    async def _plain_answers(self, method, kind: str, request, raw_request_info) -> AsyncIterator[Any]:
        """LLMServer's answer stream for a request given as a dict (the ingress's) or as vLLM's type, in plain
        JSON; closing it (the client went away) closes LLMServer's stream, which aborts the engine request."""
        if isinstance(request, dict):
            request = REQUEST_TYPES[kind].model_validate({**request, "model": self.served_model.model_id})
        async with contextlib.aclosing(await method(request, raw_request_info)) as answers:
            async for item in answers:
                yield plain(item)
