"""Triton kernels of the soft-target cross-entropy (CUDA): one program per row, online softmax over vocabulary
blocks, forward (row statistics) and backward (the gradient, written once in the logits' dtype).

The same statistics and formulas as the PyTorch twin (`soft_target_ce_twin`, see its docstring), which is the
oracle the tests compare against, under TRITON_INTERPRET=1 on CPU and compiled on CUDA. Rows of weight (forward)
or coefficient (backward) 0 read nothing: padding and prompt tokens cost a store of zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocabulary elements one program holds at a time (fp32 registers/shared memory per block); 4096 keeps 32K-152K
# vocabularies at 8-38 blocks a row. Not tuned on a GPU yet (`make gpu-check` records the timings).
MAX_BLOCK_V = 4096


@triton.jit
def _forward_kernel(z_ptr, z_stride_b, z_stride_t, x_ptr, x_stride_b, x_stride_t, w_ptr,
                    loss_ptr, lse_ptr, sum_p_ptr, lse_t_ptr, rows, vocab,
                    TARGET_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(w_ptr + row)
    if weight == 0:  # the statistics stay as allocated (zeros): the row adds nothing and gets no gradient
        return
    b = row // rows
    t = row % rows
    z_row = z_ptr + b * z_stride_b + t * z_stride_t
    x_row = x_ptr + b * x_stride_b + t * x_stride_t
    m = float("-inf")  # running max of z, and sum of exp(z - m)
    s = 0.0
    m_t = float("-inf")  # target logits only: running max of x, sum of exp(x - m_t), sum of exp(x - m_t) * z
    s_t = 0.0
    sum_p = 0.0
    sum_pz = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)  # 0 past the end: finite products
        z_max = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_max, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_max - m_new), axis=0)
        m = m_new
        if TARGET_LOGITS:
            x = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            m_t_new = tl.maximum(m_t, tl.max(x, axis=0))
            rescale = tl.exp(m_t - m_t_new)
            e = tl.exp(x - m_t_new)
            s_t = s_t * rescale + tl.sum(e, axis=0)
            sum_pz = sum_pz * rescale + tl.sum(e * z, axis=0)
            m_t = m_t_new
        else:
            p = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
            sum_p += tl.sum(p, axis=0)
            sum_pz += tl.sum(p * z, axis=0)
    lse = m + tl.log(s)
    if TARGET_LOGITS:
        sum_pz = sum_pz / s_t
        sum_p = 1.0  # p = softmax(x) sums to 1 by construction
        tl.store(lse_t_ptr + row, m_t + tl.log(s_t))
    tl.store(lse_ptr + row, lse)
    tl.store(sum_p_ptr + row, sum_p)
    tl.store(loss_ptr + row, lse * sum_p - sum_pz)


@triton.jit
def _backward_kernel(z_ptr, z_stride_b, z_stride_t, x_ptr, x_stride_b, x_stride_t, coef_ptr,
                     lse_ptr, sum_p_ptr, lse_t_ptr, grad_ptr, g_stride_b, g_stride_t, rows, vocab,
                     TARGET_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    b = row // rows
    t = row % rows
    # The gradient may be the logits themselves: each block is loaded before its gradient is stored over it.
    grad_row = grad_ptr + b * g_stride_b + t * g_stride_t
    if coef == 0:
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=cols < vocab)
        return
    z_row = z_ptr + b * z_stride_b + t * z_stride_t
    x_row = x_ptr + b * x_stride_b + t * x_stride_t
    lse = tl.load(lse_ptr + row)
    sum_p = tl.load(sum_p_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        if TARGET_LOGITS:
            p = tl.exp(tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32) - lse_t)
        else:
            p = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) * sum_p - p) * coef
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _launch_shape(vocab: int, block_v: int | None) -> tuple[int, int]:
    block = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block, (8 if block >= 2048 else 4)


def forward_stats(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *, target_is_logits: bool,
                  block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_r, lse_r, sum_p_r, lse_t_r), each [B, T] float32, as the twin's `forward_stats`."""
    batch, rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and target.stride(-1) == 1, "the vocabulary must be the unit-stride dimension"
    weights = weights.to(torch.float32).contiguous()
    stats = torch.zeros(4, batch, rows, dtype=torch.float32, device=logits.device)
    loss, lse, sum_p, lse_t = stats.unbind(0)
    block, warps = _launch_shape(vocab, block_v)
    _forward_kernel[(batch * rows,)](
        logits, logits.stride(0), logits.stride(1), target, target.stride(0), target.stride(1), weights,
        loss, lse, sum_p, lse_t, rows, vocab, TARGET_LOGITS=target_is_logits, BLOCK_V=block, num_warps=warps)
    return loss, lse, sum_p, lse_t


def backward_grad(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, lse: torch.Tensor,
                  sum_p: torch.Tensor, lse_t: torch.Tensor, *, target_is_logits: bool, block_v: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d logits [B, T, V] in the logits' dtype, into `out` (the logits may be given) or a new contiguous
    tensor, as the twin's `backward_grad`."""
    batch, rows, vocab = logits.shape
    grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    assert grad.shape == logits.shape and grad.stride(-1) == 1, (grad.shape, grad.stride())
    block, warps = _launch_shape(vocab, block_v)
    _backward_kernel[(batch * rows,)](
        logits, logits.stride(0), logits.stride(1), target, target.stride(0), target.stride(1),
        coef.to(torch.float32).contiguous(), lse.contiguous(), sum_p.contiguous(), lse_t.contiguous(), grad,
        grad.stride(0), grad.stride(1), rows, vocab, TARGET_LOGITS=target_is_logits, BLOCK_V=block, num_warps=warps)
    return grad
