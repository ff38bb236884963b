"""vLLM's CPU build: the engine arguments every CPU engine in the project needs."""

from __future__ import annotations

import os
from typing import Any

GIB = 1 << 30


def cpu_engine_kwargs() -> dict[str, Any]:
    """float32 (the CPU kernels' dtype for these models) and an explicit KV-cache size.

    Without a KV-cache size vLLM reserves 92% of the NUMA node's memory and refuses to start when other processes
    (Ray, a trainer) hold more than 8% of it. `VLLM_CPU_KVCACHE_SPACE` (GiB) overrides the 1 GiB default.
    """
    gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
    return {"dtype": "float32", "kv_cache_memory_bytes": int(gib * GIB)}
