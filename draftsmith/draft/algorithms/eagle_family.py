"""What EAGLE-3 and EAGLE-1 share: ModelOpt's `eagle` mode, the training-time-test objective, the draft's shape.

Objective: ModelOpt distils the base's own next-token distribution at each training-time-test (TTT) step; accuracy
k is how often the draft's k-th unrolled guess equals the base's greedy token. A batch that carries
`base_features` (stored by the features stage) trains offline: the base does not run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draftsmith.draft.algorithms.base import (Capabilities, DraftAlgorithm, DraftConfigError, ExportedDraft,
                                              check_decoder, text_config)

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import DraftMeta
    from draftsmith.export.manifest import DraftRecord
    from draftsmith.recipe.schema import DraftSettings, ExportSettings

_MASK_CACHE_SHAPES = 8


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def eagle_loss_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """ModelOpt weights position p by whether the base's prediction there (of token p+1) is an assistant token."""
    mask = torch.zeros_like(target_mask)
    mask[:, :-1] = target_mask[:, 1:]
    return mask


def _use_ttt_mask_cache(model, shape: tuple[int, int]) -> None:
    """Point ModelOpt's TTT attention-mask cache at the one for this batch shape.

    ModelOpt caches the masks of TTT steps >= 1 by step only, assuming every batch has the same length; batches
    padded to their own length would reuse a mask of the wrong size. Keep one cache per shape (a few, LRU).
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the converted model
    caches = module.__dict__.setdefault("_draftsmith_ttt_masks", {})
    cache = caches.pop(shape, {})
    caches[shape] = cache
    while len(caches) > _MASK_CACHE_SHAPES:
        caches.pop(next(iter(caches)))
    module._cached_attn_blk_masks = cache


def offline_inputs(model, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt's `base_model_outputs` from stored base features [batch, seq, (aux layers + 1) * hidden]: the
    aux layers' outputs (EAGLE-3) first, the final normed hidden state last."""
    hidden = getattr(model, "module", model).config.hidden_size
    assert features.shape[-1] % hidden == 0, f"features of width {features.shape[-1]} for hidden size {hidden}"
    outputs = {"base_model_hidden_states": features[..., -hidden:]}
    if features.shape[-1] > hidden:
        outputs["aux_hidden_states"] = features[..., :-hidden]
    return outputs


@contextlib.contextmanager
def offline_forward(model) -> Iterator[None]:
    """ModelOpt's EAGLE forward reading the base's states from `base_model_outputs`, for one call.

    ModelOpt fixes `eagle_offline` at conversion and then deletes the base's layers; draftsmith converts online,
    so one checkpoint serves online and offline training, quantization's calibration and the export, and switches
    the flag for the call. The offline forward needs nothing else of the base: the token embeddings and `lm_head`
    (which turns the final hidden state into the target logits) stay in the model."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the converted model
    previous = module.eagle_offline
    module.eagle_offline = True
    try:
        yield
    finally:
        module.eagle_offline = previous


class EagleFamily(DraftAlgorithm):
    """ModelOpt's EAGLE module: `num_layers` decoder layers shaped like the base's, fed the token embedding and the
    base's hidden state(s), unrolled `ttt_steps` times in training."""

    prefix = "eagle_module."
    settings_section = "eagle"
    capabilities = Capabilities(draft_vocabulary=True, aux_layers=False, offline_features=True)
    vllm_method = ""

    def _default_architecture(self) -> dict[str, Any]:
        from modelopt.torch.speculative.eagle.default_config import default_eagle_config

        return copy.deepcopy(default_eagle_config)

    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        cfg = text_config(base_config)
        check_decoder(cfg)
        eagle = settings.eagle
        if eagle.intermediate_size is None and not getattr(cfg, "intermediate_size", None):
            raise DraftConfigError(
                f"the base ({cfg.model_type}) has no intermediate_size to size the EAGLE layer from: ModelOpt's "
                "EAGLE attaches to Llama-style decoders; set draft.eagle.intermediate_size or use a "
                "Llama/Qwen/Mistral base"
            )
        if eagle.draft_vocab_size is not None and eagle.draft_vocab_size > cfg.vocab_size:
            raise DraftConfigError(
                f"draft.eagle.draft_vocab_size={eagle.draft_vocab_size} exceeds the base vocabulary "
                f"({cfg.vocab_size}); lower it or leave it unset to keep the full vocabulary"
            )

    def architecture(self, settings: DraftSettings, base_config: Any, *, dtype: str) -> dict[str, Any]:
        """ModelOpt's `eagle_architecture_config`: attention and MLP shaped like one base layer unless overridden."""
        cfg = text_config(base_config)
        eagle = settings.eagle
        arch = self._default_architecture()
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope.setdefault("rope_type", "default")
        rope["rope_theta"] = rope_theta
        arch.update(
            num_hidden_layers=eagle.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim(cfg),
            intermediate_size=eagle.intermediate_size or cfg.intermediate_size,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope,
            torch_dtype=dtype,
        )
        if eagle.draft_vocab_size is not None and eagle.draft_vocab_size < cfg.vocab_size:
            arch["draft_vocab_size"] = eagle.draft_vocab_size
        return arch

    def convert_spec(self, settings: DraftSettings, base_config: Any, *, dtype: str = "float32"
                     ) -> list[tuple[str, dict]]:
        self.check_fits(settings, base_config)
        return [("eagle", {
            "eagle_architecture_config": self.architecture(settings, base_config, dtype=dtype),
            "eagle_ttt_steps": settings.eagle.ttt_steps,
            "eagle_loss_decay_factor": settings.eagle.loss_decay_factor,
            # torch.compile costs about a minute per process on CPU and does not pay back on small drafts.
            "eagle_use_torch_compile": False,
            # ModelOpt injects a YaRN rope_scaling into the exported config unless told not to; the draft serves
            # at the base's own positions.
            "eagle_export_rope_scaling": {},
        })]

    def meta(self, settings: DraftSettings) -> dict[str, Any]:
        return {"ttt_steps": settings.eagle.ttt_steps, "draft_vocab_size": settings.eagle.draft_vocab_size}

    def feature_layers(self, settings: DraftSettings, num_layers: int) -> tuple[int, ...]:
        return ()

    def model_feature_layers(self, model: torch.nn.Module) -> tuple[int, ...]:
        config = model.eagle_config
        return tuple(config.eagle_aux_hidden_state_layer_ids) if config.use_aux_hidden_state else ()

    def num_accuracies(self, meta: DraftMeta) -> int:
        return meta.ttt_steps

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        _use_ttt_mask_cache(model, tuple(batch["input_ids"].shape))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "loss_mask": eagle_loss_mask(batch["target_mask"])}
        features = batch.get("base_features")
        if features is None:
            out = model(**inputs)
        else:
            with offline_forward(model):
                out = model(**inputs, base_model_outputs=offline_inputs(model, features))
        return out["loss"], [float(a) for a in out["train_acc"][0]]

    def check_export(self, out_dir: Path, exported: ExportedDraft, meta: DraftMeta, base_config: Any
                     ) -> dict[str, dict[str, Any]]:
        from draftsmith.export.check_export import check_eagle_draft, read_config

        base = text_config(base_config)
        eagle = read_config(out_dir / exported.variants["trtllm"]).get("eagle_config", {})
        num_aux = len(eagle.get("eagle_aux_hidden_state_layer_ids") or []) if eagle.get("use_aux_hidden_state") else 0
        return {variant: check_eagle_draft(
                    out_dir / folder, hidden_size=base.hidden_size, vocab_size=base.vocab_size, num_aux=num_aux,
                    draft_vocab_size=meta.draft_vocab_size,
                    quantized=exported.quantization is not None and variant != "vllm_cpu")
                for variant, folder in exported.variants.items()}

    def trtllm_speculative(self, draft_dir: Path, settings: ExportSettings, draft: DraftRecord
                           ) -> dict[str, Any]:
        # The portable spellings: `decoding_type: Eagle` (rebuilt as Eagle3 on the PyTorch backend when the draft
        # folder says so) and `speculative_model_dir` (1.0-1.1; an accepted alias of `speculative_model` since).
        return {"decoding_type": "Eagle", "max_draft_len": settings.max_draft_len,
                "speculative_model_dir": str(draft_dir)}

    def vllm_speculative(self, draft_dir: Path, num_speculative_tokens: int) -> dict[str, Any]:
        return {"method": self.vllm_method, "model": str(draft_dir), "num_speculative_tokens": num_speculative_tokens}
