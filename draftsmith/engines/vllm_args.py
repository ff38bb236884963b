"""The vLLM engine arguments every engine draftsmith starts shares: the recipe's `vllm` settings and the device's."""

from __future__ import annotations

import os
from typing import Any

from draftsmith.recipe.schema import VllmSettings


def engine_env(settings: VllmSettings | None) -> dict[str, str]:
    """Environment variables the engine's process must have before it starts the engine.

    On CPU, vLLM binds its worker's OpenMP threads to every core but one, which it leaves to the engine core's
    scheduler: on 2 cores that halves the compute (SmolLM2-135M, bf16: 26 tokens/s at 1 in flight and 515 at 32
    with the reservation, 33 and 678 without it; `make bench`). No core is reserved unless the environment says
    otherwise (VLLM_CPU_NUM_OF_RESERVED_CPU); `in_process` engines run no separate scheduler process at all."""
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
    if settings is not None and settings.in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


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
