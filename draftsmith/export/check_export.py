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


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    return json.loads(path.read_text())


def check_eagle_draft(folder: Path, *, hidden_size: int, vocab_size: int, num_aux: int,
                      draft_vocab_size: int | None, quantized: bool) -> dict[str, Any]:
    """Raise ExportError naming the tensor or key that is wrong; return a description of what is there."""
    folder = Path(folder)
    config, tensors = read_config(folder), _tensors(folder)
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
    return {**_check_weights(folder, config, tensors, quantized),
            "aux_layer_ids": config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")}


def check_eagle1_draft(folder: Path, *, hidden_size: int, quantized: bool) -> dict[str, Any]:
    """vLLM's EAGLE-1 layout (`EagleLlamaForCausalLM`): `fc` over [embeddings, hidden], decoder layers, and none
    of the tensors its loader refuses (an own `lm_head`, a first-layer input norm)."""
    from draftsmith.draft.algorithms.eagle1 import REFUSED_BY_VLLM, VLLM_ARCHITECTURE

    folder = Path(folder)
    config, tensors = read_config(folder), _tensors(folder)
    if config.get("architectures") != [VLLM_ARCHITECTURE]:
        raise ExportError(f"{folder}/config.json: architectures {config.get('architectures')}, expected "
                          f"[{VLLM_ARCHITECTURE!r}] (vLLM's EAGLE-1 draft)")
    if config.get("hidden_size") != hidden_size:
        raise ExportError(f"{folder}/config.json: hidden_size {config.get('hidden_size')} != base {hidden_size}")
    layers = int(config.get("num_hidden_layers") or 0)
    required = ["fc.weight"] + [f"layers.{i}.{name}.weight" for i in range(layers)
                                for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    missing = [k for k in required if k not in tensors]
    if not layers or missing:
        # vLLM leaves a tensor it is not given uninitialised, silently: every one must be here.
        raise ExportError(f"{folder}/model.safetensors lacks {missing or 'layers (num_hidden_layers is 0)'}")
    refused = [k for k in REFUSED_BY_VLLM if k in tensors]
    if refused:
        raise ExportError(f"{folder}/model.safetensors holds {refused}, which vLLM's EAGLE-1 loader refuses")
    if not _has_shape(tensors["fc.weight"], (hidden_size, 2 * hidden_size)):
        raise ExportError(f"{folder}/model.safetensors: fc.weight is {tuple(tensors['fc.weight'].shape)}, expected "
                          f"({hidden_size}, {2 * hidden_size}) over [embeddings, hidden]")
    return {**_check_weights(folder, config, tensors, quantized), "aux_layer_ids": None}


def check_dflash_draft(folder: Path, *, hidden_size: int, num_base_layers: int, block_size: int, quantized: bool
                       ) -> dict[str, Any]:
    """vLLM's DFlash layout (`DFlashDraftModel`): `fc` over the target layers' outputs, every draft layer with its
    q/k norms, `hidden_norm` and `norm`; target ids in ModelOpt's numbering (vLLM adds one itself)."""
    from draftsmith.draft.algorithms.dflash import VLLM_ARCHITECTURE

    folder = Path(folder)
    config, tensors = read_config(folder), _tensors(folder)
    if config.get("architectures") != [VLLM_ARCHITECTURE]:
        raise ExportError(f"{folder}/config.json: architectures {config.get('architectures')}, expected "
                          f"[{VLLM_ARCHITECTURE!r}]")
    dflash = config.get("dflash_config") or {}
    ids, layers = dflash.get("target_layer_ids") or [], int(config.get("num_hidden_layers") or 0)
    if config.get("block_size") != block_size or dflash.get("mask_token_id") is None:
        raise ExportError(f"{folder}/config.json: block_size {config.get('block_size')} (trained {block_size}) or "
                          "dflash_config.mask_token_id missing")
    if len(ids) != layers or not all(0 <= i < num_base_layers - 1 for i in ids):
        raise ExportError(f"{folder}/config.json: dflash_config.target_layer_ids {ids} must be {layers} base layers "
                          f"in 0..{num_base_layers - 2} (ModelOpt numbering; vLLM adds one)")
    per_layer = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
    required = ["fc.weight", "hidden_norm.weight", "norm.weight"] + [
        f"layers.{i}.{name}.weight" for i in range(layers) for name in per_layer]
    missing = [k for k in required if k not in tensors]
    if not layers or missing:
        raise ExportError(f"{folder}/model.safetensors lacks {missing[:6] or 'layers (num_hidden_layers is 0)'}")
    if not _has_shape(tensors["fc.weight"], (hidden_size, len(ids) * hidden_size)):
        raise ExportError(f"{folder}/model.safetensors: fc.weight is {tuple(tensors['fc.weight'].shape)}, expected "
                          f"({hidden_size}, {len(ids) * hidden_size}) for {len(ids)} target layers")
    return {**_check_weights(folder, config, tensors, quantized), "aux_layer_ids": list(ids)}


def _check_weights(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], quantized: bool
                   ) -> dict[str, Any]:
    """Weights in a dtype a runtime serves; a quantized draft's quantized weights with their scales."""
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
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})}


def check_medusa_export(folder: Path, *, num_heads: int, prefix: str = "medusa_heads.") -> dict[str, Any]:
    tensors = _tensors(Path(folder))
    heads = {k.removeprefix(prefix).split(".")[0] for k in tensors if k.startswith(prefix)}
    if len(heads) != num_heads:
        raise ExportError(f"{folder}: {len(heads)} Medusa heads exported (medusa_heads.*), expected {num_heads}")
    return {"tensors": len(tensors), "medusa_heads": len(heads)}
