"""DFlash: block diffusion drafting. One forward of the draft fills a block of masked positions after the base's
token, reading the outputs of a few base layers (one per draft layer) through `fc`; ModelOpt's `dflash` mode.

Training (ModelOpt `HFDFlashModel`): anchors are sampled on the assistant tokens, each block is [anchor, mask,
...] attending to the context before it and bidirectionally within; the loss distils the base's distribution at
each block position (anchor excluded). ModelOpt reports one top-1 accuracy over the block's positions. Sequences
must be a multiple of the block size, so `forward` pads each batch to one (padding is masked out).

What ModelOpt's conversion does not take from the base by itself is set here: heads, head_dim, MLP width, max
positions, norm epsilon (it falls back to Qwen3's defaults, not the base's) and the rope theta (under transformers 5
it trains at 10,000 while exporting the base's). The base's last layer is never a target layer: HF hands training
its output after the final norm, vLLM before it.

Export: ModelOpt's `export_speculative_decoding` writes `DFlashDraftModel` (`fc`, `hidden_norm`, `layers.N.*` with
q/k norms, `norm`; the base's embeddings and lm_head are shared at load) with the target layer ids in ModelOpt's
numbering, which vLLM shifts itself. vLLM serves it as `method: dflash`, `block_size - 1` speculative tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draftsmith.draft.algorithms.base import (Capabilities, DraftAlgorithm, DraftConfigError, ExportedDraft,
                                              check_decoder, text_config)
from draftsmith.draft.algorithms.eagle_family import head_dim

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import DraftMeta, LoadedDraft
    from draftsmith.export.manifest import DraftRecord
    from draftsmith.recipe.schema import DraftSettings, ExportSettings

VLLM_ARCHITECTURE = "DFlashDraftModel"


def target_layer_ids(settings: DraftSettings, num_layers: int) -> list[int]:
    """The base layers the draft reads: the recipe's, or ModelOpt's uniform spread, one per draft layer, none of
    them the base's last (where ModelOpt's spread would take it or repeat a layer, as on small bases: an even
    spread over the others)."""
    from modelopt.torch.speculative.plugins.modeling_dflash import build_target_layer_ids

    dflash = settings.dflash
    ids, count, usable = dflash.target_layer_ids, dflash.num_layers, num_layers - 1
    if ids is None:
        if usable < count:
            raise DraftConfigError(f"draft.dflash.num_layers={count} needs as many base layers besides the last, "
                                   f"and the base has {num_layers} layers; lower it")
        ids = build_target_layer_ids(num_layers, count)
        if len(set(ids)) != count or max(ids) >= usable:
            ids = [usable // 2] if count == 1 else [round(i * (usable - 1) / (count - 1)) for i in range(count)]
    if len(ids) != dflash.num_layers or len(set(ids)) != len(ids) or not all(0 <= i < num_layers - 1 for i in ids):
        raise DraftConfigError(
            f"draft.dflash.target_layer_ids={list(ids)} must be {dflash.num_layers} distinct base layers (one per "
            f"draft layer) in 0..{num_layers - 2}: the base has {num_layers} layers, and its last one is read after "
            "the final norm in training but before it in vLLM; leave it unset for a uniform spread"
        )
    return list(ids)


def mask_token_id(settings: DraftSettings, cfg: Any) -> int:
    """The recipe's mask token, else the base's pad or end-of-sequence token (the draft learns its embedding's
    meaning; vLLM embeds the same id with the base's table)."""
    if settings.dflash.mask_token_id is not None:
        return settings.dflash.mask_token_id
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(cfg, key, None)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return 0


def _padded_to_block(batch: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """The batch right-padded to a multiple of `block` positions (attention and target masks 0 there)."""
    length = batch["input_ids"].shape[1]
    extra = -length % block
    if not extra:
        return batch
    padded = {}
    for key, value in batch.items():
        pad = torch.zeros((*value.shape[:1], extra, *value.shape[2:]), dtype=value.dtype, device=value.device)
        padded[key] = torch.cat([value, pad], dim=1)
    return padded


@contextlib.contextmanager
def _offline(model) -> Iterator[None]:
    """ModelOpt's DFlash forward reading the base's states from `base_model_outputs`, for one call (as for EAGLE:
    draftsmith converts online, so one checkpoint serves both)."""
    module = getattr(model, "module", model)
    previous = module.dflash_offline
    module.dflash_offline = True
    try:
        yield
    finally:
        module.dflash_offline = previous


class DFlash(DraftAlgorithm):
    name = "dflash"
    description = "DFlash: block diffusion drafting from a few base layers; vLLM method dflash"
    prefix = "dflash_module."
    settings_section = "dflash"
    capabilities = Capabilities(draft_vocabulary=False, aux_layers=True, offline_features=True,
                                quantization=False)

    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        cfg = text_config(base_config)
        check_decoder(cfg)
        if settings.dflash.intermediate_size is None and not getattr(cfg, "intermediate_size", None):
            raise DraftConfigError(f"the base ({cfg.model_type}) has no intermediate_size to size the DFlash layers "
                                   "from; set draft.dflash.intermediate_size")
        target_layer_ids(settings, cfg.num_hidden_layers)

    def convert_spec(self, settings: DraftSettings, base_config: Any, *, dtype: str = "float32"
                     ) -> list[tuple[str, dict]]:
        self.check_fits(settings, base_config)
        cfg, dflash = text_config(base_config), settings.dflash
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        architecture = {
            "num_hidden_layers": dflash.num_layers,
            "target_layer_ids": target_layer_ids(settings, cfg.num_hidden_layers),
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "head_dim": head_dim(cfg),
            "intermediate_size": dflash.intermediate_size or cfg.intermediate_size,
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", 4096),
            "rms_norm_eps": getattr(cfg, "rms_norm_eps", 1e-6),
            "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)),
            "hidden_act": getattr(cfg, "hidden_act", "silu"),
            "torch_dtype": dtype,
        }
        return [("dflash", {
            "dflash_architecture_config": architecture,
            "dflash_block_size": dflash.block_size,
            "dflash_mask_token_id": mask_token_id(settings, cfg),
            "dflash_num_anchors": dflash.num_anchors,
            "dflash_use_torch_compile": False,
            "dflash_export_rope_scaling": {},
        })]

    def meta(self, settings: DraftSettings) -> dict[str, Any]:
        return {"block_size": settings.dflash.block_size}

    def feature_layers(self, settings: DraftSettings, num_layers: int) -> tuple[int, ...]:
        return tuple(target_layer_ids(settings, num_layers))

    def model_feature_layers(self, model: torch.nn.Module) -> tuple[int, ...]:
        return tuple(model.target_layer_ids)

    def num_accuracies(self, meta: DraftMeta) -> int:
        return 1  # ModelOpt's top-1 accuracy over the block's positions

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        block = getattr(model, "module", model).dflash_block_size
        batch = _padded_to_block(batch, block)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "loss_mask": batch["target_mask"].float()}  # DFlash's mask sits on the predicted token: no shift
        features = batch.get("base_features")
        if features is None:
            out = model(**inputs)
        else:
            hidden = getattr(model, "module", model).config.hidden_size
            with _offline(model):
                out = model(**inputs, base_model_outputs={"aux_hidden_states": features[..., :-hidden],
                                                          "base_model_hidden_states": features[..., -hidden:]})
        return out["loss"], [float(a) for a in out["train_acc"][0]]

    def export(self, loaded: LoadedDraft, out_dir: Path, *, dtype: torch.dtype) -> ExportedDraft:
        from modelopt.torch.export.unified_export_hf import export_speculative_decoding

        from draftsmith.export.draft_export import VLLM_DRAFT, ExportError, cast_tensors

        try:
            export_speculative_decoding(loaded.model, dtype=dtype, export_dir=out_dir / VLLM_DRAFT)
        except AssertionError as exc:
            raise ExportError(f"ModelOpt cannot export this DFlash draft: {exc}") from exc
        cast_tensors(out_dir / VLLM_DRAFT, dtype)
        return ExportedDraft({"vllm": VLLM_DRAFT, "vllm_cpu": VLLM_DRAFT}, loaded.meta.quantization)

    def check_export(self, out_dir: Path, exported: ExportedDraft, meta: DraftMeta, base_config: Any
                     ) -> dict[str, dict[str, Any]]:
        from draftsmith.export.check_export import check_dflash_draft

        base = text_config(base_config)
        return {variant: check_dflash_draft(out_dir / folder, hidden_size=base.hidden_size,
                                            num_base_layers=base.num_hidden_layers, block_size=meta.block_size,
                                            quantized=exported.quantization is not None and variant != "vllm_cpu")
                for variant, folder in exported.variants.items()}

    def unsupported_reason(self, runtime: str) -> str | None:
        if runtime == "trtllm":
            return ("TensorRT-LLM's LLM API has no DFlash decoding config in the releases draftsmith targets (its "
                    "PyTorch backend drafts with EAGLE-3, MTP, n-gram and draft-target models)")
        return None

    def trtllm_speculative(self, draft_dir: Path, settings: ExportSettings, draft: DraftRecord
                           ) -> dict[str, Any]:
        raise AssertionError(self.unsupported_reason("trtllm"))

    def vllm_speculative(self, draft_dir: Path, num_speculative_tokens: int) -> dict[str, Any]:
        import json

        block = json.loads((Path(draft_dir) / "config.json").read_text())["block_size"]
        # vLLM proposes one bonus position plus K masked ones; the draft was trained on blocks of block_size.
        return {"method": "dflash", "model": str(draft_dir),
                "num_speculative_tokens": min(num_speculative_tokens, block - 1)}
