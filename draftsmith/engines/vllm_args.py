"""The vLLM engine arguments every engine draftsmith starts shares: the recipe's `vllm` settings and the device's."""

from __future__ import annotations

from typing import Any

from draftsmith.recipe.schema import VllmSettings


def engine_env(settings: VllmSettings | None) -> dict[str, str]:
    """Environment variables the engine's process must have before it starts the engine."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if settings is not None and settings.in_process else {}


def engine_args(settings: VllmSettings | None, device: str) -> dict[str, Any]:
    """vLLM engine arguments for `device` ("cpu" or "gpu"); None takes the schema's defaults."""
    settings = settings or VllmSettings()
    kwargs: dict[str, Any] = {"enforce_eager": settings.enforce_eager}
    if device == "cpu":
        from draftsmith.engines.vllm_cpu import cpu_engine_kwargs

        kwargs.update(cpu_engine_kwargs(settings.dtype))
    elif settings.dtype != "auto":
        kwargs["dtype"] = settings.dtype
    return kwargs
