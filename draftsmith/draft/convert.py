"""Attach a draft module to a frozen base with ModelOpt (`modelopt.torch.speculative`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from draftsmith.draft.algorithms import DraftConfigError, get_algorithm
from draftsmith.recipe.schema import DraftSettings

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)


def base_state_keys(base_dir: str | Path) -> set[str]:
    """The names of the base's tensors, from a weightless (meta-device) copy: no second load of an 8B base."""
    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        return set(AutoModelForCausalLM.from_config(config).state_dict())


def freeze_base(model: torch.nn.Module, algorithm: str) -> list[str]:
    """Make exactly the draft's parameters trainable and return their names.

    ModelOpt freezes the base for EAGLE but leaves it trainable for Medusa, so this sets it either way.
    """
    prefix = get_algorithm(algorithm).prefix
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(prefix)
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise DraftConfigError(f"the model has no {prefix}* parameters: it is not a converted {algorithm} model")
    return trainable


def assert_only_draft_trainable(model: torch.nn.Module, algorithm: str) -> None:
    prefix = get_algorithm(algorithm).prefix
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(prefix)]
    assert not leaked, f"base parameters would train: {leaked[:5]}"


def set_draft_vocabulary(model: torch.nn.Module, d2t: torch.Tensor) -> None:
    """Install the draft-to-target offsets and start the draft's lm_head from the base's rows of those tokens."""
    module = model.eagle_module
    if not hasattr(module, "d2t"):
        raise DraftConfigError("the draft has the full vocabulary; there is no d2t mapping to set")
    if d2t.shape != module.d2t.shape:
        raise DraftConfigError(f"draft vocabulary mapping has {d2t.numel()} entries, the draft {module.d2t.numel()}")
    module.d2t.copy_(d2t)
    target_ids = torch.arange(len(d2t)) + d2t
    with torch.no_grad():
        module.lm_head.weight.copy_(model.lm_head.weight[target_ids].to(module.lm_head.weight.dtype))


def convert_base(base_dir: str | Path, settings: DraftSettings, *, d2t: torch.Tensor | None = None,
                 dtype: str = "float32") -> torch.nn.Module:
    """The base with a randomly initialised draft attached; only the draft requires grad."""
    import modelopt.torch.speculative as mtsp

    base_config = AutoConfig.from_pretrained(str(base_dir))
    algorithm = get_algorithm(settings.algorithm)
    spec = algorithm.convert_spec(settings, base_config, dtype=dtype)  # raises DraftConfigError before loading weights
    model = load_base(base_dir, TORCH_DTYPES[dtype])
    torch.manual_seed(settings.seed)
    try:
        mtsp.convert(model, spec)
    except (AssertionError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DraftConfigError(
            f"ModelOpt cannot attach a {settings.algorithm} draft to {base_dir} "
            f"({type(model).__name__}, model_type {base_config.model_type!r}): {exc}"
        ) from exc
    algorithm.prepare(model)
    if d2t is not None:
        set_draft_vocabulary(model, d2t)
    freeze_base(model, settings.algorithm)
    assert_only_draft_trainable(model, settings.algorithm)
    return model
