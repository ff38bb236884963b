"""The draft module in the format the runtimes load: the algorithm's exporter, plus the helpers exporters share.

Each algorithm (draftsmith/draft/algorithms/) writes its variants: `draft/` for TensorRT-LLM, `draft-vllm/` for
vLLM, and `draft-vllm-dequantized/` for vLLM's CPU build when the draft is quantized (it has no FP8 kernels: the
same QAT weights multiplied back by their scales, activations not quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draftsmith.draft.algorithms import ExportedDraft, get_algorithm
from draftsmith.draft.checkpoint import DraftMeta, load_draft

TRTLLM_DRAFT = "draft"
VLLM_DRAFT = "draft-vllm"
VLLM_CPU_DRAFT = "draft-vllm-dequantized"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale", "weight_scale_2", "pre_quant_scale")


class ExportError(ValueError):
    """An export is missing, malformed or in the way; the message names the file or tensor."""


def cast_tensors(folder: Path, dtype: torch.dtype) -> None:
    """ModelOpt keeps the trainer's float32 for unquantized tensors; the runtimes want the serving dtype."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    cast = {k: (v.to(dtype) if v.dtype == torch.float32 and not k.endswith(SCALE_SUFFIXES) else v)
            for k, v in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each quantized weight times its `weight_scale` (per tensor or per channel: FP8, INT8), in `dtype`; scales
    dropped. Packed 4-bit formats are not handled."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(SCALE_SUFFIXES):
            continue
        scale = tensors.get(key.removesuffix(".weight") + ".weight_scale") if key.endswith(".weight") else None
        if scale is not None:
            value = value.to(torch.float32) * scale.to(torch.float32).reshape(
                scale.shape + (1,) * (value.dim() - scale.dim()))
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def dequantize_folder(source: Path, target: Path, dtype: torch.dtype) -> None:
    """`target` = `source` dequantized, without its quantization config."""
    out = dequantized(load_file(str(source / "model.safetensors")), dtype)
    target.mkdir(parents=True)
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (target / "config.json").write_text(json.dumps(config, indent=2))


def export_draft(checkpoint: Path, base_dir: Path, out_dir: Path, *, dtype: str) -> tuple[ExportedDraft, DraftMeta]:
    """Write the draft's variants under `out_dir` with its algorithm's exporter; returns them and the draft's meta."""
    loaded = load_draft(checkpoint, base_dir)
    return get_algorithm(loaded.meta.algorithm).export(loaded, out_dir, dtype=DTYPES[dtype]), loaded.meta


def vllm_cpu_variant(out_dir: Path, quantization: dict | None, dtype: torch.dtype) -> dict[str, str]:
    """The variant vLLM's CPU build loads, beside `draft-vllm/`: the same folder when unquantized, its dequantized
    copy for FP8/INT8 (no such kernels on CPU), none for packed 4-bit formats."""
    if quantization is None:
        return {"vllm_cpu": VLLM_DRAFT}
    if quantization["format"] in ("fp8", "int8"):
        dequantize_folder(out_dir / VLLM_DRAFT, out_dir / VLLM_CPU_DRAFT, dtype)
        return {"vllm_cpu": VLLM_CPU_DRAFT}
    return {}
