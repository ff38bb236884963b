"""EAGLE's reduced draft vocabulary: the most frequent assistant tokens, mapped back to the base's ids.

The draft's lm_head scores `size` tokens; `d2t[i]` is the offset from draft id i to its base id (base id =
i + d2t[i], the convention of ModelOpt, vLLM and TensorRT-LLM); `t2d` marks the base ids the draft can emit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def draft_vocabulary(counts: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(d2t, t2d, report) for the `size` most frequent tokens; ties and unseen tokens go by lowest id."""
    if not 0 < size <= len(counts):
        raise ValueError(f"draft vocabulary size {size} must be in 1..{len(counts)} (the base vocabulary)")
    by_frequency = np.lexsort((np.arange(len(counts)), -counts))
    chosen = np.sort(by_frequency[:size])
    d2t = torch.as_tensor(chosen - np.arange(size), dtype=torch.long)
    t2d = torch.zeros(len(counts), dtype=torch.bool)
    t2d[torch.as_tensor(chosen)] = True
    total = int(counts.sum())
    report = {
        "draft_vocab_size": size, "base_vocab_size": len(counts),
        "distinct_target_tokens": int((counts > 0).sum()),
        "target_token_coverage": float(counts[chosen].sum() / total) if total else 0.0,
    }
    return d2t, t2d, report
