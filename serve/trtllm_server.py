"""The TensorRT-LLM engine deployment: TensorRT-LLM's LLM API with the exported EAGLE draft.

Written against TensorRT-LLM's documented LLM API (`LLM(**update_llm_args_with_extra_dict(...))`,
`generate_async(..., streaming=True)`, `RequestOutput.abort()`, `get_stats_async()`); the options are the
`extra_llm_api_options` YAML written at export. TensorRT-LLM cannot be installed on the CPU machines this project
is developed on, so this class has not run against a real engine: the tests drive it with a named fake of
the LLM API (see README, "What runs where").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving import openai_format as fmt
from draftsmith.serving.limits import admit, prompt_token_ids
from draftsmith.serving.model_source import materialize
from serve.stats_board import start_reporting

log = logging.getLogger(__name__)


def trtllm_args(settings: ServingSettings, model) -> dict[str, Any]:
    """LLM(...) keyword arguments: the export's options YAML, plus iteration stats for acceptance metrics."""
    options = model.trtllm_options()
    if not settings.speculative:
        options.pop("speculative_config", None)
    elif settings.num_speculative_tokens:
        options["speculative_config"]["max_draft_len"] = settings.num_speculative_tokens
    options = {**options, "enable_iter_perf_stats": True, **settings.engine_kwargs,
               "trust_remote_code": settings.trust_remote_code}
    if settings.max_model_len:
        options.setdefault("max_seq_len", settings.max_model_len)
    return {"model": str(model.base_dir), "tokenizer": str(model.base_dir), **options}


def sampling_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"max_tokens": request.get("max_tokens") or request.get("max_completion_tokens"),
              "n": request.get("n") or 1, "temperature": request.get("temperature"), "top_p": request.get("top_p"),
              "stop": request.get("stop"), "seed": request.get("seed")}
    return {k: v for k, v in kwargs.items() if v is not None}


class TRTLLMServer:
    """One TensorRT-LLM engine replica; speaks the same plain-JSON methods the ingress calls on the vLLM one."""

    async def __init__(self, llm_config=None, *, serving: dict[str, Any], stats_board=None, llm_factory=None,
                       sampling_params_cls=None):
        from transformers import AutoTokenizer

        self.settings = ServingSettings.model_validate(serving)
        self.served_model = await asyncio.to_thread(materialize, self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.served_model.base_dir)
        args = trtllm_args(self.settings, self.served_model)
        if sampling_params_cls is None:
            from tensorrt_llm import SamplingParams as sampling_params_cls
        self._sampling_params_cls = sampling_params_cls
        if llm_factory is None:
            from tensorrt_llm import LLM
            from tensorrt_llm.llmapi.llm_args import update_llm_args_with_extra_dict

            def llm_factory(kwargs):
                base = {k: kwargs.pop(k) for k in ("model", "tokenizer")}
                return LLM(**update_llm_args_with_extra_dict(base, kwargs))
        self.llm = await asyncio.to_thread(llm_factory, args)
        self._spec = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
        if stats_board is not None:
            self._reporting = start_reporting(stats_board, self.engine_stats)

    # ------------------------------------------------------------------------------ the LLMServer surface
    async def check_health(self) -> None:
        if getattr(self.llm, "_executor", None) is not None and getattr(self.llm._executor, "doing_shutdown", False):
            raise RuntimeError("TensorRT-LLM executor is shut down")

    async def admit(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """The prompt's token count, or the 4xx for a prompt the chat template or tokenizer cannot take."""
        return admit(self.tokenizer, kind, body)

    async def chat(self, request: dict[str, Any], raw_request_info=None):
        async with contextlib.aclosing(self._generate(fmt.CHAT, request)) as items:  # closing aborts
            async for item in items:
                yield item

    async def completions(self, request: dict[str, Any], raw_request_info=None):
        async with contextlib.aclosing(self._generate(fmt.COMPLETIONS, request)) as items:
            async for item in items:
                yield item

    async def engine_stats(self) -> dict[str, Any]:
        """Speculative counters from TensorRT-LLM's iteration stats (specDecodingStats), cumulative."""
        async for stats in self.llm.get_stats_async(timeout=1):
            spec = (stats if isinstance(stats, dict) else {}).get("specDecodingStats") or {}
            drafted = int(spec.get("numDraftTokens", 0))
            if drafted:
                self._spec["num_drafts"] += int(spec.get("numRequestsWithDraftTokens", 0))
                self._spec["num_draft_tokens"] += drafted
                self._spec["num_accepted_tokens"] += int(spec.get("numAcceptedTokens", 0))
        drafts = self._spec["num_drafts"]
        spec = {**self._spec, "acceptance_length": 1 + self._spec["num_accepted_tokens"] / drafts if drafts else None}
        return {"model": self.served_model.model_id, "model_version": self.served_model.version,
                **self.served_model.card(), "spec_decode": spec}

    # ----------------------------------------------------------------------------------------- helpers
    async def _generate(self, kind: str, request: dict[str, Any]):
        model, stream = self.served_model.model_id, bool(request.get("stream"))
        prompt = prompt_token_ids(self.tokenizer, kind, request)
        sampling = sampling_kwargs(request)
        n = sampling["n"]
        params = self._sampling_params_cls(**sampling)
        request_id, created = fmt.new_id(kind), None
        output = self.llm.generate_async(prompt, sampling_params=params, streaming=stream)
        sent = [0] * n
        try:
            if not stream:
                result = await output.aresult()
                choices = [fmt.choice(kind, o.index, o.text, fmt.finish_reason(o.finish_reason), False)
                           for o in result.outputs]
                completion = sum(len(o.token_ids) for o in result.outputs)
                yield fmt.response(kind, request_id, model, choices, usage_=fmt.usage(len(prompt), completion))
                return
            if kind == fmt.CHAT:
                yield fmt.sse(fmt.response(kind, request_id, model, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(n)], stream=True))
            async for partial in output:
                events = []
                for o in partial.outputs:
                    text = o.text[sent[o.index]:]
                    sent[o.index] = len(o.text)
                    reason = fmt.finish_reason(o.finish_reason)
                    if text or reason:
                        events.append(fmt.sse(fmt.response(kind, request_id, model, [
                            fmt.choice(kind, o.index, text, reason, True)], created, stream=True)))
                if events:
                    yield "".join(events)
            completion = sum(len(o.token_ids) for o in partial.outputs)
            if (request.get("stream_options") or {}).get("include_usage"):
                yield fmt.sse(fmt.response(kind, request_id, model, [], created,
                                           fmt.usage(len(prompt), completion), stream=True))
            yield "data: [DONE]\n\n"
        finally:
            if not output.finished:
                output.abort()  # the client went away: free the slot in the engine

    @classmethod
    def get_deployment_options(cls, llm_config=None) -> dict[str, Any]:
        return {}
