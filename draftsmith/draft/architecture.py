"""The draft module's shape: ModelOpt's convert config sized from the base's config, checked before any work."""

from __future__ import annotations

import copy
from typing import Any

from draftsmith.recipe.schema import DraftSettings

# Where each algorithm's trainable tensors live in the converted model.
DRAFT_PREFIX = {"eagle3": "eagle_module.", "eagle1": "eagle_module.", "medusa": "medusa_heads."}
MODELOPT_MODE = {"eagle3": "eagle", "eagle1": "eagle", "medusa": "medusa"}


class DraftConfigError(ValueError):
    """The recipe's draft does not fit the base model; the message names the key and how to fix it."""


def text_config(config: Any) -> Any:
    """The language model's config (the text part of multimodal configs)."""
    return getattr(config, "text_config", None) or getattr(config, "llm_config", None) or config


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


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


def check_fits(settings: DraftSettings, base_config: Any) -> None:
    """Raise DraftConfigError when the recipe's draft cannot be attached to this base."""
    cfg = text_config(base_config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not getattr(cfg, key, None):
            raise DraftConfigError(
                f"the base config ({getattr(cfg, 'model_type', '?')}) has no {key}: ModelOpt's speculative "
                "modules attach to decoder-only transformers (Llama, Qwen, Mistral families)"
            )
    eagle = settings.eagle
    if settings.algorithm == "medusa":
        return
    if eagle.intermediate_size is None and not getattr(cfg, "intermediate_size", None):
        raise DraftConfigError(
            f"the base ({cfg.model_type}) has no intermediate_size to size the EAGLE layer from: ModelOpt's EAGLE "
            "attaches to Llama-style decoders; set draft.eagle.intermediate_size or use a Llama/Qwen/Mistral base"
        )
    if eagle.draft_vocab_size is not None and eagle.draft_vocab_size > cfg.vocab_size:
        raise DraftConfigError(
            f"draft.eagle.draft_vocab_size={eagle.draft_vocab_size} exceeds the base vocabulary ({cfg.vocab_size}); "
            "lower it or leave it unset to keep the full vocabulary"
        )
    if settings.algorithm == "eagle1" and eagle.aux_hidden_state_layer_ids is not None:
        raise DraftConfigError(
            "draft.eagle.aux_hidden_state_layer_ids is set but draft.algorithm=eagle1 reads only the last "
            "hidden state; use algorithm eagle3 or remove the key"
        )
    if settings.algorithm == "eagle3":
        aux_layer_ids(settings, cfg.num_hidden_layers)


def eagle_architecture(settings: DraftSettings, base_config: Any, *, dtype: str) -> dict[str, Any]:
    """ModelOpt's `eagle_architecture_config`: attention and MLP shaped like one base layer unless overridden."""
    from modelopt.torch.speculative.config import eagle3_default_config
    from modelopt.torch.speculative.eagle.default_config import default_eagle_config

    cfg = text_config(base_config)
    eagle = settings.eagle
    arch = copy.deepcopy(eagle3_default_config if settings.algorithm == "eagle3" else default_eagle_config)
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = rope_theta
    arch.update(
        num_hidden_layers=eagle.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=_head_dim(cfg),
        intermediate_size=eagle.intermediate_size or cfg.intermediate_size,
        hidden_act=getattr(cfg, "hidden_act", "silu"),
        rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope,
        torch_dtype=dtype,
    )
    if eagle.draft_vocab_size is not None and eagle.draft_vocab_size < cfg.vocab_size:
        arch["draft_vocab_size"] = eagle.draft_vocab_size
    if settings.algorithm == "eagle3":
        arch["eagle_aux_hidden_state_layer_ids"] = aux_layer_ids(settings, cfg.num_hidden_layers)
    return arch


def convert_spec(settings: DraftSettings, base_config: Any, *, dtype: str = "float32") -> list[tuple[str, dict]]:
    """The `mtsp.convert` mode list for the recipe's algorithm."""
    check_fits(settings, base_config)
    if settings.algorithm == "medusa":
        return [("medusa", {"medusa_num_heads": settings.medusa.num_heads,
                            "medusa_num_layers": settings.medusa.num_layers})]
    return [("eagle", {
        "eagle_architecture_config": eagle_architecture(settings, base_config, dtype=dtype),
        "eagle_ttt_steps": settings.eagle.ttt_steps,
        "eagle_loss_decay_factor": settings.eagle.loss_decay_factor,
        # torch.compile costs about a minute per process on CPU and does not pay back on small drafts.
        "eagle_use_torch_compile": False,
        # ModelOpt injects a YaRN rope_scaling into the exported config unless told not to; the draft serves at
        # the base's own positions.
        "eagle_export_rope_scaling": {},
    })]
