"""Check an exported draft folder against what the runtimes read, before the export reports success.

The field failures users hit (vLLM, ModelOpt and TensorRT-LLM issues): missing tensors, a wrong `fc` width for
the fused layers, an all-zero or missing `d2t` with a reduced vocabulary, weights in a dtype nobody serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from draftsmith.export.draft_export import SCALE_SUFFIXES, ExportError

SERVED_DTYPES = {torch.bfloat16, torch.float16}
QUANTIZED_DTYPES = {torch.float8_e4m3fn, torch.int8, torch.uint8}


def _has_shape(tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Packed 4-bit weights (uint8, two values a byte) hold half the elements of their logical shape."""
    if tensor.dtype == torch.uint8:
        return tensor.numel() * 2 == shape[0] * shape[1]
    return tuple(tensor.shape) == shape


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    return json.loads(path.read_text())


def check_eagle_draft(folder: Path, *, hidden_size: int, vocab_size: int, num_aux: int,
                      draft_vocab_size: int | None, quantized: bool) -> dict[str, Any]:
    """Raise ExportError naming the tensor or key that is wrong; return a description of what is there."""
    folder = Path(folder)
    config, tensors = _config(folder), _tensors(folder)
    if not any(a.endswith(("Eagle3", "Eagle")) or "Eagle" in a for a in config.get("architectures", [])):
        raise ExportError(f"{folder}/config.json: architectures {config.get('architectures')} is no EAGLE draft")
    if config.get("hidden_size") != hidden_size:
        raise ExportError(f"{folder}/config.json: hidden_size {config.get('hidden_size')} != base {hidden_size}")
    required = ["norm.weight", "lm_head.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight"]
    if num_aux:
        required.append("fc.weight")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ExportError(f"{folder}/model.safetensors lacks {missing}")
    if num_aux and not _has_shape(tensors["fc.weight"], (hidden_size, num_aux * hidden_size)):
        raise ExportError(f"{folder}/model.safetensors: fc.weight is {tuple(tensors['fc.weight'].shape)}, expected "
                          f"({hidden_size}, {num_aux * hidden_size}) for {num_aux} fused layers")
    out_vocab = draft_vocab_size or vocab_size
    if not _has_shape(tensors["lm_head.weight"], (out_vocab, hidden_size)):
        raise ExportError(f"{folder}/model.safetensors: lm_head.weight is {tuple(tensors['lm_head.weight'].shape)}, "
                          f"expected ({out_vocab}, {hidden_size})")
    if draft_vocab_size and draft_vocab_size < vocab_size:
        if config.get("draft_vocab_size") != draft_vocab_size:
            raise ExportError(f"{folder}/config.json: draft_vocab_size {config.get('draft_vocab_size')} != "
                              f"{draft_vocab_size} (TensorRT-LLM treats the folder as EAGLE-3 only with it)")
        d2t = tensors.get("d2t")
        if d2t is None or d2t.numel() != draft_vocab_size:
            raise ExportError(f"{folder}/model.safetensors: d2t missing or not {draft_vocab_size} long")
        if not d2t.any():
            raise ExportError(f"{folder}/model.safetensors: d2t is all zeros: the draft vocabulary was never "
                              "mapped, every draft token would be read as one of the first base tokens")
        if int((torch.arange(len(d2t)) + d2t).max()) >= vocab_size:
            raise ExportError(f"{folder}/model.safetensors: d2t maps past the base vocabulary ({vocab_size})")
    weights = {k: v for k, v in tensors.items() if k.endswith(".weight")}
    allowed = SERVED_DTYPES | (QUANTIZED_DTYPES if quantized else set())
    wrong = {k: str(v.dtype) for k, v in weights.items() if v.dtype not in allowed}
    if wrong:
        raise ExportError(f"{folder}/model.safetensors: weights in unexpected dtypes {dict(list(wrong.items())[:4])}")
    quantized_weights = [k for k, v in weights.items() if v.dtype in QUANTIZED_DTYPES]
    if quantized:
        if not quantized_weights or "quantization_config" not in config:
            raise ExportError(f"{folder}: the draft was quantized but the export has no quantized weights or no "
                              "quantization_config in config.json")
        no_scale = [k for k in quantized_weights if k.removesuffix(".weight") + ".weight_scale" not in tensors]
        if no_scale:
            raise ExportError(f"{folder}/model.safetensors: quantized weights without weight_scale: {no_scale[:4]}")
    return {"tensors": len(tensors), "quantized_weights": len(quantized_weights),
            "scales": sum(1 for k in tensors if k.endswith(SCALE_SUFFIXES)),
            "parameters": sum(v.numel() for k, v in tensors.items() if not k.endswith(SCALE_SUFFIXES)),
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()}),
            "aux_layer_ids": config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")}


def check_medusa_export(folder: Path, *, num_heads: int, prefix: str = "medusa_heads.") -> dict[str, Any]:
    tensors = _tensors(Path(folder))
    heads = {k.removeprefix(prefix).split(".")[0] for k in tensors if k.startswith(prefix)}
    if len(heads) != num_heads:
        raise ExportError(f"{folder}: {len(heads)} Medusa heads exported (medusa_heads.*), expected {num_heads}")
    return {"tensors": len(tensors), "medusa_heads": len(heads)}
