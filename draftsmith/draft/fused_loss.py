"""The EAGLE objective through `kernels.soft_target_cross_entropy`: the one override of ModelOpt draftsmith makes.

ModelOpt's `HFEagleModel.forward` calls `self._eagle_loss(p, base_token, eagle_logits, loss_mask)` once per
training-time-test step, and that method builds `log_softmax(eagle_logits)`, `mask * p` and their product, each
[batch, tokens, draft vocabulary], keeping two of them for the backward, per step. `install_fused_loss` binds
`fused_eagle_loss` (same arguments, same two results, one fused kernel) on the converted model instance, so
nothing else of ModelOpt changes and a model without it computes exactly ModelOpt's loss.

Because it replaces a private method, it first checks that the method is the one it was written against: the
SHA-256 of `HFEagleModel._eagle_loss`'s source as installed (read from the file, so the driver checks without
importing ModelOpt) must equal `EXPECTED_SOURCE_SHA256`, taken from ModelOpt `EXPECTED_MODELOPT`; on the model it
also checks that nothing (ModelOpt's own `torch.compile` of the method, say) has replaced it already.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import types
from pathlib import Path
from typing import Literal

import torch

from draftsmith.draft.algorithms import get_algorithm
from draftsmith.draft.algorithms.eagle_family import EagleFamily
from kernels import soft_target_cross_entropy

EXPECTED_MODELOPT = "0.47.0"
EXPECTED_SOURCE_SHA256 = "b14f9d035bd87d478cb7584169057d9b665f067e3b57e422726dc634d7312ce8"
# HFEagleModel.forward of EXPECTED_MODELOPT, in which each TTT step's draft logits are read by `_eagle_loss` alone
# (a loop variable, not returned): the fused loss may then write their gradient over them.
EXPECTED_FORWARD_SHA256 = "18584caa78256e77af88f3546043ff4675887bbd2962263a7f521b73ba69a9f3"
LossKernel = Literal["modelopt", "fused"]


class LossKernelError(RuntimeError):
    """The installed ModelOpt's EAGLE loss is not the one the fused loss replaces."""


def eagle_loss_source(method: str = "_eagle_loss") -> str:
    """The source of the installed `HFEagleModel.<method>`, as `inspect.getsource` gives it, without importing
    ModelOpt (about 17 s of a core)."""
    spec = importlib.util.find_spec("modelopt")
    if spec is None or not spec.submodule_search_locations:
        raise LossKernelError("ModelOpt (nvidia-modelopt) is not installed; the EAGLE loss comes from it")
    path = Path(spec.submodule_search_locations[0], "torch", "speculative", "plugins", "hf_eagle.py")
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == "HFEagleModel":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return "".join(text.splitlines(keepends=True)[item.lineno - 1:item.end_lineno])
    raise LossKernelError(f"{path} defines no HFEagleModel.{method}")


def check_modelopt_eagle_loss() -> None:
    """Raise LossKernelError (one line) unless ModelOpt's EAGLE loss is the one `fused_eagle_loss` replaces."""
    digest = hashlib.sha256(eagle_loss_source().encode()).hexdigest()
    if digest != EXPECTED_SOURCE_SHA256:
        installed = importlib.metadata.version("nvidia-modelopt")
        raise LossKernelError(
            f"ModelOpt {installed}'s HFEagleModel._eagle_loss is not the one the fused loss replaces (ModelOpt "
            f"{EXPECTED_MODELOPT}'s, sha256 {EXPECTED_SOURCE_SHA256[:12]}, got {digest[:12]}): set "
            "training.loss_kernel=modelopt, or compare the new method with draftsmith/draft/fused_loss.py and update "
            "EXPECTED_SOURCE_SHA256 there")


@functools.cache
def logits_unread_after_loss() -> bool:
    """Whether the installed ModelOpt's training forward is the one that reads the draft's logits only through
    `_eagle_loss` (EXPECTED_FORWARD_SHA256). Elsewhere the fused loss still runs, with a gradient of its own."""
    return hashlib.sha256(eagle_loss_source("forward").encode()).hexdigest() == EXPECTED_FORWARD_SHA256


def has_eagle_loss(algorithm: str) -> bool:
    """Whether the draft algorithm trains with ModelOpt's EAGLE loss (the one `fused_eagle_loss` replaces)."""
    return isinstance(get_algorithm(algorithm), EagleFamily)


def resolve_loss_kernel(setting: str, algorithm: str) -> LossKernel:
    """The recipe's `training.loss_kernel` for a draft algorithm, checked on the driver before any worker starts:
    "auto" is fused for the EAGLE family (leaner and, on CPU, faster: draftsmith/bench/loss_kernel.py) and
    ModelOpt's own for the algorithms that have no such loss."""
    if setting == "modelopt" or not has_eagle_loss(algorithm):
        assert setting != "fused", "the recipe refuses training.loss_kernel=fused for a non-EAGLE draft"
        return "modelopt"
    check_modelopt_eagle_loss()
    return "fused"


def fused_eagle_loss(self: torch.nn.Module | None, base_output_softmax_logits: torch.Tensor,
                     base_output_predict_tok: torch.Tensor, eagle_logits: torch.Tensor, loss_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's `_eagle_loss` (same arguments and results) with the loss from the fused kernel.

    base_output_softmax_logits [B, T, V] (the base's distribution over the draft vocabulary), base_output_predict_tok
    [B, T], eagle_logits [B, T, V], loss_mask [B, >= T]. Returns (loss, accuracy of the draft's greedy token
    against the base's over the masked positions), both 0-dim.
    """
    mask = loss_mask[:, : eagle_logits.shape[1]]
    assert base_output_softmax_logits.shape == eagle_logits.shape, (base_output_softmax_logits.shape,
                                                                     eagle_logits.shape)
    # The gradient goes over the logits (no [B, T, V] allocation in the backward) where ModelOpt reads them no more.
    loss = soft_target_cross_entropy(eagle_logits, base_output_softmax_logits, mask,
                                     grad_in_logits=logits_unread_after_loss())
    return loss, eagle_accuracy(base_output_predict_tok, eagle_logits, mask)


def eagle_accuracy(base_token: torch.Tensor, eagle_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How often the draft's greedy token [B, T] equals the base's over the masked positions, as ModelOpt computes
    it (an argmax: no vocabulary-sized temporary)."""
    valid = mask.bool()
    correct = (base_token == eagle_logits.detach().argmax(dim=-1)) & valid
    return correct.sum().float() / valid.sum().clamp_min(1).float()


def install_fused_loss(model: torch.nn.Module) -> None:
    """Make the converted EAGLE `model` (not a DeepSpeed engine: the module it wraps) use `fused_eagle_loss`."""
    from modelopt.torch.speculative.plugins.hf_eagle import HFEagleModel

    check_modelopt_eagle_loss()
    if not isinstance(model, HFEagleModel):
        raise LossKernelError(f"the fused EAGLE loss needs a ModelOpt EAGLE model, got {type(model).__name__}")
    if type(model)._eagle_loss is not HFEagleModel._eagle_loss or "_eagle_loss" in vars(model):
        raise LossKernelError(
            f"{type(model).__name__}._eagle_loss is not ModelOpt's method (eagle_use_torch_compile compiles it, or "
            "it was replaced already); the fused loss replaces only the plain method: set training.loss_kernel="
            "modelopt")
    model._eagle_loss = types.MethodType(fused_eagle_loss, model)
