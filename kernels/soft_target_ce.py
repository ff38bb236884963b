"""`soft_target_cross_entropy`: the masked soft-target cross-entropy as one autograd function, dispatched to the
Triton kernel (CUDA) or the PyTorch twin (CPU, float64, or on request).

    loss = -sum_r w_r sum_v p_rv log_softmax(z_r)_v / (sum_r w_r + eps)
    d loss / d z_r = (softmax(z_r) * sum_v p_rv - p_r) * w_r / (sum_r w_r + eps)

which is ModelOpt's EAGLE loss (`HFEagleModel._eagle_loss`: `-sum(mask * p * log_softmax(z)) / (mask.sum() +
1e-5)`) and its autograd gradient, to rounding. Kept for the backward: the inputs (no copies) and four floats a
row; the only (tokens x vocabulary) tensor either pass allocates is the gradient itself, and with
`grad_in_logits` not even that: the backward writes the gradient over the logits it has just read, block by block,
as fused cross-entropy kernels do (liger-kernel's), for logits that nothing reads after the loss.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch

from kernels import soft_target_ce_twin as twin

Impl = Literal["auto", "torch", "triton"]


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[B, T, V] view of a [N, V] or [B, T, V] tensor whose vocabulary dimension has unit stride (a copy otherwise)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [tokens, vocab] or [batch, tokens, vocab], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _backend(device: torch.device, acc: torch.dtype, impl: Impl) -> Any:
    """The module computing the row statistics and the gradient (the twin and the Triton module share signatures).
    "auto" takes Triton for CUDA tensors up to float32 when it is installed (CUDA builds of torch bring it)."""
    if impl == "auto":
        triton_fits = device.type == "cuda" and acc != torch.float64 and importlib.util.find_spec("triton") is not None
        impl = "triton" if triton_fits else "torch"
    if impl == "torch":
        return twin
    if device.type != "cuda":
        raise ValueError(f"impl='triton' needs CUDA tensors, got {device.type}; use impl='auto' or 'torch'")
    from kernels import soft_target_ce_triton

    return soft_target_ce_triton


class _SoftTargetCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                denominator: torch.Tensor, target_is_logits: bool, backend: Any, acc: torch.dtype,
                grad_in_logits: bool = False) -> torch.Tensor:
        options = {"target_is_logits": target_is_logits} | ({"acc": acc} if backend is twin else {})
        row_loss, lse, sum_p, lse_t = backend.forward_stats(logits, target, weights, **options)
        ctx.save_for_backward(logits, target, weights, lse, sum_p, lse_t, denominator)
        ctx.backend, ctx.options, ctx.grad_in_logits = backend, options, grad_in_logits
        return (row_loss * weights).sum(dtype=acc) / denominator

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, weights, lse, sum_p, lse_t, denominator = ctx.saved_tensors
        coef = weights.to(lse.dtype) * (grad_loss.to(lse.dtype) / denominator.to(lse.dtype))  # [B, T]
        # In place: the logits' version counter moves, so an autograd node that saved them too and runs later
        # fails loudly ("modified by an inplace operation") instead of reading the gradient as logits.
        out = logits if ctx.grad_in_logits else None
        grad = ctx.backend.backward_grad(logits, target, coef, lse, sum_p, lse_t, out=out, **ctx.options)
        return grad, None, None, None, None, None, None, None


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, *,
                              target_is_logits: bool = False, eps: float = 1e-5, impl: Impl = "auto",
                              grad_in_logits: bool = False) -> torch.Tensor:
    """Masked soft-target cross-entropy of `logits` against `target`, a scalar (float32; float64 for float64 inputs).

    logits: [N, V] or [B, T, V], the draft's logits (any float dtype; views with strided rows are fine).
    target: the same shape: probabilities p, or with `target_is_logits` logits x with p = softmax(x), formed in
        blocks inside (the probability tensor never exists). Constant: it gets no gradient.
    loss_mask: [N] or [B, T], row weights w (bool, int or float; ModelOpt's are 0/1).
    eps: added to sum(w), as ModelOpt does (an all-zero mask gives loss 0, not NaN).
    impl: "auto" (Triton on CUDA for float16/bfloat16/float32 where installed, else the twin), "torch" or "triton".
    grad_in_logits: the backward writes the gradient into the logits' own storage (no vocabulary-sized allocation
        at all); their values are gone after it. Only for logits nothing reads after the loss's backward.
    """
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
    if loss_mask.shape != logits.shape[:-1]:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must be the logits' without the vocabulary "
                         f"dimension, {tuple(logits.shape[:-1])}")
    if target.requires_grad:
        raise ValueError("the target gets no gradient here: pass target.detach() (ModelOpt's EAGLE target is the "
                         "frozen base's distribution)")
    if not (logits.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"logits and target must be floating point, got {logits.dtype} and {target.dtype}")
    acc = torch.float64 if torch.float64 in (logits.dtype, target.dtype) else torch.float32
    z, p = _as_rows(logits, "logits"), _as_rows(target, "target")
    weights = (loss_mask.unsqueeze(0) if loss_mask.dim() == 1 else loss_mask).to(acc)
    # ModelOpt's `mask.sum() + 1e-5` with torch's promotion (float32 for an integer mask), to match it exactly.
    denominator = (loss_mask.sum() + eps).to(acc)
    backend = _backend(logits.device, acc, impl)
    return _SoftTargetCrossEntropy.apply(z, p, weights, denominator, target_is_logits, backend, acc, grad_in_logits)
