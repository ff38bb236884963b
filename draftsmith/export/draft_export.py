"""The draft module in the format the runtimes load, written by ModelOpt's exporters, then checked.

EAGLE-3 / EAGLE-1: `export_speculative_decoding` gives `config.json` (e.g. `LlamaForCausalLMEagle3`, with
`draft_vocab_size` and the aux-layer ids) and `model.safetensors` (`fc`, `layers.N.*`, `norm`, `lm_head`, `d2t`;
FP8 weights with their scales when quantized). Three variants, because the runtimes disagree:
  - `draft/`: ModelOpt's numbering of the aux layers (output of layer j), which TensorRT-LLM reads;
  - `draft-vllm/`: the same weights, aux ids + 1 (vLLM 0.32 counts "after k layers", 0 = embeddings);
  - `draft-vllm-dequantized/` (quantized drafts only): FP8/INT8 weights multiplied back by their scales, for
    vLLM's CPU build, which has no FP8 kernels. Same QAT weights, activations not quantized.
Medusa: ModelOpt's speculative exporter rejects it; `export_hf_checkpoint` writes the base with `medusa_heads.*`
(`draft/`), and `draft-vllm/` holds the heads alone in the layout vLLM's Medusa loader reads (ModelOpt's
`medusa_heads.H.L.linear.*` / `medusa_heads.H.N.weight` are FasterDecoding's `H.L.linear.*` / `H.N.weight`, which
vLLM remaps), dequantized when quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftsmith.draft.checkpoint import load_draft

TRTLLM_DRAFT = "draft"
VLLM_DRAFT = "draft-vllm"
VLLM_CPU_DRAFT = "draft-vllm-dequantized"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale", "weight_scale_2", "pre_quant_scale")


class ExportError(ValueError):
    """An export is missing, malformed or in the way; the message names the file or tensor."""


def _cast_tensors(folder: Path, dtype: torch.dtype) -> None:
    """ModelOpt keeps the trainer's float32 for unquantized tensors; the runtimes want the serving dtype."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    cast = {k: (v.to(dtype) if v.dtype == torch.float32 and not k.endswith(SCALE_SUFFIXES) else v)
            for k, v in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _vllm_variant(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    eagle = config.get("eagle_config", {})
    if eagle.get("eagle_aux_hidden_state_layer_ids"):
        eagle["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in eagle["eagle_aux_hidden_state_layer_ids"]]
    (target / "config.json").write_text(json.dumps(config, indent=2))


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


def vllm_medusa_folder(hf_export: Path, target: Path, *, hidden_size: int, vocab_size: int, dtype: torch.dtype
                       ) -> None:
    """The Medusa heads of a ModelOpt HF export as a vLLM Medusa draft (`MedusaModel` config + heads)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(hf_export.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(str(path)).items() if k.startswith("medusa_heads.")})
    heads = {k.removeprefix("medusa_heads."): v for k, v in dequantized(tensors, dtype).items()}
    num_heads = len({k.split(".")[0] for k in heads})
    num_layers = len({k.split(".")[1] for k in heads if ".linear." in k}) if heads else 0
    target.mkdir(parents=True)
    save_file(heads, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": hidden_size,
              "vocab_size": vocab_size, "num_heads": num_heads, "num_hidden_layers": num_layers,
              "truncated_vocab_size": vocab_size, "medusa_fc_bias": any(k.endswith(".bias") for k in heads),
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (target / "config.json").write_text(json.dumps(config, indent=2))


def export_draft(checkpoint: Path, base_dir: Path, out_dir: Path, *, dtype: str) -> dict[str, Any]:
    """Write the draft variants under `out_dir`; returns {variant: folder name} and the draft's description."""
    from modelopt.torch.export.unified_export_hf import export_hf_checkpoint, export_speculative_decoding

    loaded = load_draft(checkpoint, base_dir)
    meta, torch_dtype = loaded.meta, DTYPES[dtype]
    quantization = meta.get("quantization")
    variants: dict[str, str] = {}
    if meta["algorithm"] == "medusa":
        config = loaded.model.config
        export_hf_checkpoint(loaded.model, dtype=torch_dtype, export_dir=str(out_dir / TRTLLM_DRAFT))
        variants["trtllm"] = TRTLLM_DRAFT
        vllm_medusa_folder(out_dir / TRTLLM_DRAFT, out_dir / VLLM_DRAFT, hidden_size=config.hidden_size,
                           vocab_size=config.vocab_size, dtype=torch_dtype)
        variants["vllm"] = variants["vllm_cpu"] = VLLM_DRAFT
        return {"variants": variants, "algorithm": "medusa", "quantization": quantization, "meta": meta}
    try:
        export_speculative_decoding(loaded.model, dtype=torch_dtype, export_dir=out_dir / TRTLLM_DRAFT)  # mutates it
    except AssertionError as exc:
        # ModelOpt 0.47's exporter asserts the EAGLE-3 layout (e.g. a final `norm`), which its own EAGLE-1 default
        # config does not build.
        raise ExportError(f"ModelOpt cannot export the {meta['algorithm']} draft of {checkpoint} to the runtimes' "
                          f"format: {exc}") from exc
    _cast_tensors(out_dir / TRTLLM_DRAFT, torch_dtype)
    variants["trtllm"] = TRTLLM_DRAFT
    _vllm_variant(out_dir / TRTLLM_DRAFT, out_dir / VLLM_DRAFT)
    variants["vllm"] = VLLM_DRAFT
    if quantization is None:
        variants["vllm_cpu"] = VLLM_DRAFT
    elif quantization["format"] in ("fp8", "int8"):
        dequantize_folder(out_dir / VLLM_DRAFT, out_dir / VLLM_CPU_DRAFT, torch_dtype)
        variants["vllm_cpu"] = VLLM_CPU_DRAFT
    return {"variants": variants, "algorithm": meta["algorithm"], "quantization": quantization, "meta": meta}
