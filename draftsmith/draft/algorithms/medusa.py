"""Medusa: extra decoding heads on the base's last hidden state; head k guesses the token k + 2 places ahead.

Export: ModelOpt's speculative exporter rejects Medusa; `export_hf_checkpoint` writes the base with
`medusa_heads.*` (`draft/`), and `draft-vllm/` holds the heads alone in the layout vLLM's Medusa loader reads
(ModelOpt's `medusa_heads.H.L.linear.*` / `medusa_heads.H.N.weight` are FasterDecoding's `H.L.linear.*` /
`H.N.weight`, which vLLM remaps), dequantized when quantized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from draftsmith.draft.algorithms.base import (Capabilities, DraftAlgorithm, ExportedDraft, check_decoder,
                                              text_config)

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import DraftMeta, LoadedDraft
    from draftsmith.export.manifest import DraftRecord
    from draftsmith.recipe.schema import DraftSettings, ExportSettings

IGNORE_INDEX = -100


def vllm_medusa_folder(hf_export: Path, target: Path, *, hidden_size: int, vocab_size: int, dtype: torch.dtype
                       ) -> None:
    """The Medusa heads of a ModelOpt HF export as a vLLM Medusa draft (`MedusaModel` config + heads)."""
    from draftsmith.export.draft_export import dequantized

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


class Medusa(DraftAlgorithm):
    name = "medusa"
    description = "Medusa: residual heads on the base's last hidden state"
    prefix = "medusa_heads."
    settings_section = "medusa"
    capabilities = Capabilities(draft_vocabulary=False, aux_layers=False, offline_features=False)
    objective_revision = 2  # 2: heads learn token t + 2 + k (they learned t + 1 + k)

    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        check_decoder(text_config(base_config))

    def convert_spec(self, settings: DraftSettings, base_config: Any, *, dtype: str = "float32"
                     ) -> list[tuple[str, dict]]:
        self.check_fits(settings, base_config)
        return [("medusa", {"medusa_num_heads": settings.medusa.num_heads,
                            "medusa_num_layers": settings.medusa.num_layers})]

    def meta(self, settings: DraftSettings) -> dict[str, Any]:
        return {"medusa_heads": settings.medusa.num_heads}

    def num_accuracies(self, meta: DraftMeta) -> int:
        return meta.medusa_heads

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        # ModelOpt's Medusa loss takes labels already shifted (labels[t] = the token after t) and shifts them by
        # 1 + k more for head k, so head k at position t learns token t + 2 + k: the one after the base's own
        # next token, which is what vLLM and TensorRT-LLM ask of it. Accuracy k: head k's top-1 hit rate on the
        # assistant tokens.
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        labels[:, :-1] = batch["input_ids"][:, 1:].masked_fill(batch["target_mask"][:, 1:] == 0, IGNORE_INDEX)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        accuracies = []
        for k, logits in enumerate(out["medusa_logits"]):
            predicted = logits[:, : -(1 + k)].detach().argmax(-1)
            wanted = labels[:, 1 + k:]
            valid = wanted != IGNORE_INDEX
            accuracies.append(float(((predicted == wanted) & valid).sum()) / max(1, int(valid.sum())))
        return out["loss"], accuracies

    def export(self, loaded: LoadedDraft, out_dir: Path, *, dtype: torch.dtype) -> ExportedDraft:
        from modelopt.torch.export.unified_export_hf import export_hf_checkpoint

        from draftsmith.export.draft_export import TRTLLM_DRAFT, VLLM_DRAFT

        config = loaded.model.config
        export_hf_checkpoint(loaded.model, dtype=dtype, export_dir=str(out_dir / TRTLLM_DRAFT))
        vllm_medusa_folder(out_dir / TRTLLM_DRAFT, out_dir / VLLM_DRAFT, hidden_size=config.hidden_size,
                           vocab_size=config.vocab_size, dtype=dtype)
        return ExportedDraft({"trtllm": TRTLLM_DRAFT, "vllm": VLLM_DRAFT, "vllm_cpu": VLLM_DRAFT},
                             loaded.meta.quantization)

    def check_export(self, out_dir: Path, exported: ExportedDraft, meta: DraftMeta, base_config: Any
                     ) -> dict[str, dict[str, Any]]:
        from draftsmith.export.check_export import check_medusa_export

        heads = meta.medusa_heads
        return {"trtllm": check_medusa_export(out_dir / exported.variants["trtllm"], num_heads=heads),
                "vllm": check_medusa_export(out_dir / exported.variants["vllm"], num_heads=heads, prefix="")}

    def unsupported_reason(self, runtime: str) -> str | None:
        if runtime == "trtllm":
            return ("TensorRT-LLM ran Medusa only on its TensorRT engine backend, which its current releases dropped "
                    "(llm_args.py has no Medusa config); the export is a HF checkpoint with medusa_heads.* and, for "
                    "vLLM, draft-vllm/")
        return None

    def trtllm_speculative(self, draft_dir: Path, settings: ExportSettings, draft: DraftRecord
                           ) -> dict[str, Any]:
        raise AssertionError(self.unsupported_reason("trtllm"))

    def vllm_speculative(self, draft_dir: Path, num_speculative_tokens: int) -> dict[str, Any]:
        return {"method": "medusa", "model": str(draft_dir), "num_speculative_tokens": num_speculative_tokens}
