"""Fused training kernels, each a Triton kernel for CUDA with a PyTorch reference twin and tests that compare them.
No model code: plain tensors in, tensors out (draftsmith.draft wires them into the drafts' objectives).

`soft_target_cross_entropy(logits, target, loss_mask)`: the masked soft-target cross-entropy of EAGLE training
(ModelOpt's `_eagle_loss`), forward and backward, in row blocks (twin) or one program per row with an online
softmax over vocabulary blocks (Triton), so none of the (tokens x vocabulary) float temporaries of the plain
expression (log-softmax, mask * p, their product, and their gradients) is ever made; the target may be given as
logits, its softmax then formed block by block too.

Why not a maintained library (liger-kernel 0.8.5, cut-cross-entropy 25.1.1, read at those versions):
- cut-cross-entropy's `linear_cross_entropy` takes hard labels (token ids) only, and needs the hidden states and
  the classifier weight (it fuses the lm_head); EAGLE distils the base's whole distribution.
- liger's cross-entropy is hard-label too; its `jsd`/`kl_div` take the student's *log-probabilities*, so the
  log-softmax we avoid would be materialised first; `fused_linear_kl_div` does take target probabilities but fuses
  the lm_head (ModelOpt computes the draft's logits inside `_eagle_forward`, outside the loss), computes KL (the
  loss differs from ModelOpt's by the target's entropy), masks by an ignore index with its own normalisation, not
  ModelOpt's `mask.sum() + 1e-5`; `fused_linear_jsd` wants the teacher's hidden states and weight as well.
- neither runs on CPU (Triton only), where draftsmith trains by default, so a twin was needed regardless.
What is left is two Triton kernels of about 40 lines each; a new dependency is not worth that.
"""

from kernels.soft_target_ce import soft_target_cross_entropy

__all__ = ["soft_target_cross_entropy"]
