"""EAGLE-1: the draft reads the base's last hidden state only (no fused layers), served by vLLM's `method: eagle`.

ModelOpt's HF EAGLE-1 (its default config) runs plain Llama decoder layers on the base's final (normed) hidden
state, with no `fc`, no final norm and the base's `lm_head`. vLLM's `EagleLlamaForCausalLM` computes
`fc(cat(embeds, hidden))`, has no input norm on its first layer (`nn.Identity`), no final norm, and takes the
target's `lm_head`. The two agree exactly when the first layer's input norm is dropped in training too (ModelOpt's
`use_input_layernorm_in_first_layer`, which its HF plugin does not read, so `prepare` drops it) and the export's
`fc` passes the hidden state through (`[0 | I]`: the embeddings get weight zero, as ModelOpt's draft ignores them).
Checked token for token against ModelOpt's own `pseudo_speculative_generate` (tests/test_eagle1_export.py).

TensorRT-LLM: its PyTorch backend builds EAGLE-3 drafts only (`EagleDecodingConfig` always selects an Eagle3 mode;
EAGLE-1 ran on the TensorRT engine backend, which current releases dropped), so an EAGLE-1 export has no
TensorRT-LLM config. vLLM's EAGLE-1 loader has no draft vocabulary (d2t), so neither does this draft.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from draftsmith.draft.algorithms.base import Capabilities, DraftConfigError, ExportedDraft, text_config
from draftsmith.draft.algorithms.eagle_family import EagleFamily

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import DraftMeta, LoadedDraft
    from draftsmith.recipe.schema import DraftSettings

VLLM_ARCHITECTURE = "EagleLlamaForCausalLM"
# Tensors vLLM's EAGLE-1 loader refuses: it attaches the target's lm_head and has no first-layer input norm.
REFUSED_BY_VLLM = ("lm_head.weight", "layers.0.input_layernorm.weight")


def _modelopt_exporter(model: torch.nn.Module):
    """ModelOpt's EAGLE exporter (it quantizes weights and writes their scales) without its EAGLE-3 key check,
    which requires a final `norm` that EAGLE-1 does not have; `check_eagle1_draft` checks the result instead."""
    from modelopt.torch.export.plugins.hf_spec_export import EagleExporter

    class Eagle1Exporter(EagleExporter):
        def _check_valid_sd(self, export_sd: dict) -> None:
            return None

    return Eagle1Exporter(model)


def vllm_eagle1_folder(modelopt_dir: Path, target: Path, *, hidden_size: int, vocab_size: int,
                       dtype: torch.dtype) -> None:
    """ModelOpt's exported EAGLE-1 draft as vLLM's `EagleLlamaForCausalLM`: a pass-through `fc`, no lm_head."""
    tensors = {k: v for k, v in load_file(str(modelopt_dir / "model.safetensors")).items()
               if k not in REFUSED_BY_VLLM}
    tensors = {k: (v.to(dtype) if v.dtype == torch.float32 and k.endswith(".weight") else v)
               for k, v in tensors.items()}
    tensors["fc.weight"] = torch.cat([torch.zeros(hidden_size, hidden_size), torch.eye(hidden_size)], 1).to(dtype)
    target.mkdir(parents=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((modelopt_dir / "config.json").read_text())
    config.update(architectures=[VLLM_ARCHITECTURE], model_type="llama", vocab_size=vocab_size,
                  tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))
    config.pop("draft_vocab_size", None)
    eagle = config.setdefault("eagle_config", {})
    eagle.update(use_aux_hidden_state=False, use_input_layernorm_in_first_layer=False, use_last_layernorm=False)
    eagle.pop("eagle_aux_hidden_state_layer_ids", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))


class Eagle1(EagleFamily):
    name = "eagle1"
    description = "EAGLE-1: reads the base's last hidden state; vLLM method eagle"
    capabilities = Capabilities(draft_vocabulary=False, aux_layers=False, offline_features=True)
    layout_revision = 2  # 2: no input norm on the first layer (vLLM's layout); 1 had ModelOpt's
    vllm_method = "eagle"

    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        super().check_fits(settings, base_config)
        eagle = settings.eagle
        if eagle.aux_hidden_state_layer_ids is not None:
            raise DraftConfigError(
                "draft.eagle.aux_hidden_state_layer_ids is set but draft.algorithm=eagle1 reads only the last "
                "hidden state; use algorithm eagle3 or remove the key"
            )
        if eagle.draft_vocab_size is not None and eagle.draft_vocab_size < text_config(base_config).vocab_size:
            raise DraftConfigError(
                f"draft.eagle.draft_vocab_size={eagle.draft_vocab_size} with draft.algorithm=eagle1: vLLM's EAGLE-1 "
                "loader has no reduced draft vocabulary (d2t); remove the key or use algorithm eagle3"
            )

    def prepare(self, model: torch.nn.Module) -> None:
        model.eagle_module.layers[0].input_layernorm = torch.nn.Identity()

    def meta(self, settings: DraftSettings) -> dict[str, Any]:
        return {"ttt_steps": settings.eagle.ttt_steps, "draft_vocab_size": None}

    def export(self, loaded: LoadedDraft, out_dir: Path, *, dtype: torch.dtype) -> ExportedDraft:
        from draftsmith.export.draft_export import VLLM_DRAFT, vllm_cpu_variant

        config = text_config(loaded.model.config)
        modelopt_dir = out_dir / ".modelopt-eagle1"
        _modelopt_exporter(loaded.model).export(modelopt_dir, dtype)
        vllm_eagle1_folder(modelopt_dir, out_dir / VLLM_DRAFT, hidden_size=config.hidden_size,
                           vocab_size=config.vocab_size, dtype=dtype)
        shutil.rmtree(modelopt_dir)
        quantization = loaded.meta.quantization
        return ExportedDraft({"vllm": VLLM_DRAFT, **vllm_cpu_variant(out_dir, quantization, dtype)}, quantization)

    def check_export(self, out_dir: Path, exported: ExportedDraft, meta: DraftMeta, base_config: Any
                     ) -> dict[str, dict[str, Any]]:
        from draftsmith.export.check_export import check_eagle1_draft

        base = text_config(base_config)
        return {variant: check_eagle1_draft(out_dir / folder, hidden_size=base.hidden_size,
                                            quantized=exported.quantization is not None and variant != "vllm_cpu")
                for variant, folder in exported.variants.items()}

    def unsupported_reason(self, runtime: str) -> str | None:
        if runtime == "trtllm":
            return ("TensorRT-LLM's PyTorch backend builds EAGLE-3 drafts only (EagleDecodingConfig always selects "
                    "an Eagle3 mode); EAGLE-1 ran on its TensorRT engine backend, which current releases dropped")
        return None
