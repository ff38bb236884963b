"""The quantization formats a recipe may ask for, as ModelOpt configurations, and where each can run."""

from __future__ import annotations

import copy
from typing import Any

# recipe format -> (ModelOpt config name, needs CUDA). NVFP4's fake quantization has no CPU kernel in ModelOpt
# 0.47; FP8, INT8 and INT4-AWQ run (and pass QAT gradients) on CPU.
FORMATS: dict[str, tuple[str, bool]] = {
    "fp8": ("FP8_DEFAULT_CFG", False),
    "int8": ("INT8_DEFAULT_CFG", False),
    "int4_awq": ("INT4_AWQ_CFG", False),
    "nvfp4": ("NVFP4_DEFAULT_CFG", True),
}
# The KV cache is quantized to FP8 whatever the weight format: the KV format both TensorRT-LLM and vLLM load.
KV_CONFIG = "FP8_KV_CFG"


class QuantizationError(ValueError):
    """The recipe asks for a quantization this model or device cannot have; the message says what to change."""


def check_format(fmt: str, *, use_gpu: bool) -> None:
    if fmt == "none":
        return
    if fmt not in FORMATS:
        raise QuantizationError(f"quantization.format={fmt!r} is unknown; use one of {['none', *FORMATS]}")
    if FORMATS[fmt][1] and not use_gpu:
        raise QuantizationError(
            f"quantization.format={fmt} needs a CUDA device (ModelOpt's {fmt} fake quantization has no CPU kernel) "
            "but training.use_gpu is false; run on GPU workers or pick fp8, int8 or int4_awq"
        )


def modelopt_config(fmt: str, *, kv_cache: bool, quantize_base: bool) -> dict[str, Any]:
    """ModelOpt's config for `fmt`, with FP8 KV-cache quantizers added and the base's quantizers switched off
    when only the draft is to be quantized. Later entries of `quant_cfg` override earlier ones."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, FORMATS[fmt][0]))
    entries = list(config["quant_cfg"])
    if kv_cache:
        entries += list(copy.deepcopy(getattr(mtq, KV_CONFIG))["quant_cfg"])
    if not quantize_base:
        entries += [{"quantizer_name": "model.*", "enable": False}, {"quantizer_name": "lm_head.*", "enable": False}]
    config["quant_cfg"] = entries
    return config


def enabled_quantizers(model) -> dict[str, int]:
    """How many quantizers are on, split into the base's and the draft's (under any algorithm's prefix)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from draftsmith.draft.algorithms import draft_prefixes

    counts = {"base": 0, "draft": 0}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            counts["draft" if name.startswith(draft_prefixes()) else "base"] += 1
    return counts
