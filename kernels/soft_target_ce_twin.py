"""PyTorch reference twin of the soft-target cross-entropy kernel: the same loss and gradient, in row blocks, so no
(tokens x vocabulary) float32 temporary outlives one block. Used on CPU and as the test oracle.

Shapes: logits and target [B, T, V] (any strides with a unit last stride), weights and coef [B, T]. Per row r:
    loss_r  = -sum_v p_rv log_softmax(z_r)_v
    sum_p_r = sum_v p_rv                          (1 up to rounding; kept so the gradient is exact for any p)
    grad_r  = (softmax(z_r) * sum_p_r - p_r) * coef_r
With target logits x instead of probabilities, p_r = softmax(x_r) is formed block by block and never exists whole.
Each block is copied into a float32 (float64 for float64 inputs) workspace and goes through PyTorch's fused
`log_softmax` / `softmax`, whose exponential is about twice as fast on CPU as an elementwise `exp`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements per row block. Each pass reuses two or three float32 workspaces of this size (4 MiB each), allocated
# once per call: temporaries allocated per block made glibc map and unmap them, and the page faults cost more than
# the arithmetic (at 4,096 x 128,256: 1.2M faults a call instead of the gradient's 0.26M). On 2 cores, 1 << 20 was
# faster than 1 << 18 (more operations, each a parallel region) and 1 << 22 (blocks out of cache).
BLOCK_ELEMENTS = 1 << 20


def _block_rows(rows: int, vocab: int) -> int:
    return min(rows, max(1, BLOCK_ELEMENTS // vocab))


def row_blocks(batch: int, rows: int, vocab: int) -> Iterator[tuple[int, slice]]:
    """(batch index, row slice) covering [batch, rows] in blocks of about BLOCK_ELEMENTS elements."""
    step = _block_rows(rows, vocab)
    for b in range(batch):
        for start in range(0, rows, step):
            yield b, slice(start, min(rows, start + step))


def _workspaces(rows: int, vocab: int, acc: torch.dtype, device: torch.device, count: int) -> list[torch.Tensor]:
    return list(torch.empty(count, _block_rows(rows, vocab), vocab, dtype=acc, device=device).unbind(0))


def forward_stats(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *, target_is_logits: bool,
                  acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_r, lse_r, sum_p_r, lse_t_r), each [B, T] in `acc`, as the Triton kernel's, except lse_t: left 0 here,
    since this backward recomputes softmax(x) with PyTorch's fused softmax (on CPU its exp is about twice as fast
    as an elementwise exp).

    Per block: loss = -sum_v p log_softmax(z), from `torch.log_softmax` into a workspace. Blocks whose rows all have
    weight 0 are skipped (their statistics stay 0): they add nothing to the loss and get a zero gradient.
    """
    batch, rows, vocab = logits.shape
    assert target.shape == logits.shape and weights.shape == (batch, rows), (logits.shape, target.shape, weights.shape)
    stats = torch.zeros(4, batch, rows, dtype=acc, device=logits.device)
    loss, lse, sum_p, lse_t = stats.unbind(0)
    copy_ws, log_ws, *p_ws = _workspaces(rows, vocab, acc, logits.device, 3 if target_is_logits else 2)
    for b, block in row_blocks(batch, rows, vocab):
        if not bool(weights[b, block].any()):
            continue
        n = block.stop - block.start
        z = copy_ws[:n].copy_(logits[b, block])  # [R, V] in acc
        log_q = torch.log_softmax(z, dim=-1, out=log_ws[:n])
        lse[b, block] = z[:, 0] - log_q[:, 0]
        if target_is_logits:  # p = softmax(x), block by block
            p = torch.softmax(copy_ws[:n].copy_(target[b, block]), dim=-1, out=p_ws[0][:n])
            sum_p[b, block] = 1.0
        else:
            p = target[b, block]
            sum_p[b, block] = p.sum(dim=-1, dtype=acc)
        loss[b, block] = log_q.mul_(p).sum(dim=-1).neg_()
    return loss, lse, sum_p, lse_t


def backward_grad(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, lse: torch.Tensor,
                  sum_p: torch.Tensor, lse_t: torch.Tensor, *, target_is_logits: bool, acc: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d logits [B, T, V] in the logits' dtype: (softmax(z) * sum_p - p) * coef per row, the softmaxes
    recomputed by `torch.softmax` (lse and lse_t are not needed). Into `out` (the logits themselves may be given:
    each block is copied into the workspace before its gradient is written back), else a new contiguous tensor."""
    batch, rows, vocab = logits.shape
    grad = out if out is not None else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    copy_ws, q_ws, *p_ws = _workspaces(rows, vocab, acc, logits.device, 3 if target_is_logits else 2)
    for b, block in row_blocks(batch, rows, vocab):
        if not bool(coef[b, block].any()):
            grad[b, block] = 0
            continue
        n = block.stop - block.start
        q = torch.softmax(copy_ws[:n].copy_(logits[b, block]), dim=-1, out=q_ws[:n])
        if target_is_logits:
            q.sub_(torch.softmax(copy_ws[:n].copy_(target[b, block]), dim=-1, out=p_ws[0][:n]))
        else:
            q.mul_(sum_p[b, block, None]).sub_(target[b, block])  # the target's dtype converted on the fly
        grad[b, block] = q.mul_(coef[b, block, None])
    return grad
