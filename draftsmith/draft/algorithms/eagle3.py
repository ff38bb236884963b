"""EAGLE-3: the draft fuses three of the base's layers (low, middle, high) and may predict a reduced vocabulary.

Export: ModelOpt's `export_speculative_decoding` writes `config.json` (`LlamaForCausalLMEagle3`, with
`draft_vocab_size` and the aux-layer ids) and `model.safetensors` (`fc`, `layers.N.*`, `norm`, `lm_head`, `d2t`;
FP8 weights with their scales when quantized). Three variants, because the runtimes disagree:
  - `draft/`: ModelOpt's numbering of the aux layers (output of layer j), which TensorRT-LLM reads;
  - `draft-vllm/`: the same weights, aux ids + 1 (vLLM 0.32 counts "after k layers", 0 = embeddings);
  - `draft-vllm-dequantized/` (quantized drafts only): FP8/INT8 weights multiplied back by their scales, for
    vLLM's CPU build, which has no FP8 kernels.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draftsmith.draft.algorithms.base import Capabilities, DraftConfigError, ExportedDraft, text_config
from draftsmith.draft.algorithms.eagle_family import EagleFamily

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import LoadedDraft
    from draftsmith.export.manifest import DraftRecord
    from draftsmith.recipe.schema import DraftSettings, ExportSettings


def aux_layer_ids(settings: DraftSettings, num_layers: int) -> list[int]:
    """EAGLE-3's fused base layers: the recipe's, or ModelOpt's low/middle/high default, within the base."""
    from modelopt.torch.speculative.plugins.hf_eagle import default_eagle_aux_layer_ids

    ids = settings.eagle.aux_hidden_state_layer_ids
    if ids is None:
        return [i for i in default_eagle_aux_layer_ids(num_layers) if i < num_layers]
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise DraftConfigError(
            f"draft.eagle.aux_hidden_state_layer_ids={ids} must be distinct base layers in 0..{num_layers - 1} "
            f"(the base has {num_layers} layers); leave it unset for ModelOpt's default"
        )
    return sorted(ids)


def _vllm_variant(source: Path, target: Path) -> None:
    """`source` with the aux ids counted as vLLM counts them."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    eagle = config.get("eagle_config", {})
    if eagle.get("eagle_aux_hidden_state_layer_ids"):
        eagle["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in eagle["eagle_aux_hidden_state_layer_ids"]]
    (target / "config.json").write_text(json.dumps(config, indent=2))


class Eagle3(EagleFamily):
    name = "eagle3"
    description = "EAGLE-3: fuses low/middle/high base layers; reduced draft vocabulary (d2t)"
    capabilities = Capabilities(draft_vocabulary=True, aux_layers=True, offline_features=True)
    vllm_method = "eagle3"

    def _default_architecture(self) -> dict[str, Any]:
        from modelopt.torch.speculative.config import eagle3_default_config

        return copy.deepcopy(eagle3_default_config)

    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        super().check_fits(settings, base_config)
        aux_layer_ids(settings, text_config(base_config).num_hidden_layers)

    def architecture(self, settings: DraftSettings, base_config: Any, *, dtype: str) -> dict[str, Any]:
        arch = super().architecture(settings, base_config, dtype=dtype)
        arch["eagle_aux_hidden_state_layer_ids"] = aux_layer_ids(settings, text_config(base_config).num_hidden_layers)
        return arch

    def feature_layers(self, settings: DraftSettings, num_layers: int) -> tuple[int, ...]:
        return tuple(aux_layer_ids(settings, num_layers))

    def export(self, loaded: LoadedDraft, out_dir: Path, *, dtype: torch.dtype) -> ExportedDraft:
        from modelopt.torch.export.unified_export_hf import export_speculative_decoding

        from draftsmith.export.draft_export import (TRTLLM_DRAFT, VLLM_DRAFT, ExportError, cast_tensors,
                                                    vllm_cpu_variant)

        try:
            export_speculative_decoding(loaded.model, dtype=dtype, export_dir=out_dir / TRTLLM_DRAFT)  # mutates it
        except AssertionError as exc:
            raise ExportError(f"ModelOpt cannot export this EAGLE-3 draft to the runtimes' format: {exc}") from exc
        cast_tensors(out_dir / TRTLLM_DRAFT, dtype)
        _vllm_variant(out_dir / TRTLLM_DRAFT, out_dir / VLLM_DRAFT)
        quantization = loaded.meta.quantization
        return ExportedDraft({"trtllm": TRTLLM_DRAFT, "vllm": VLLM_DRAFT,
                              **vllm_cpu_variant(out_dir, quantization, dtype)}, quantization)

    def trtllm_speculative(self, draft_dir: Path, settings: ExportSettings, draft: DraftRecord
                           ) -> dict[str, Any]:
        speculative = super().trtllm_speculative(draft_dir, settings, draft)
        # TensorRT-LLM sizes the draft's fc for 3 captured layers unless told the ids (numbered like ModelOpt's).
        aux = draft.aux_layer_ids
        if aux is not None and len(aux) != 3:
            speculative["eagle3_layers_to_capture"] = list(aux)
        return speculative
