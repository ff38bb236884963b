"""One training forward of a converted model: the loss and the per-step top-1 accuracies people watch.

EAGLE: ModelOpt distils the base's own next-token distribution at each training-time-test (TTT) step; accuracy k
is how often the draft's k-th unrolled guess equals the base's greedy token. Medusa: head k predicts the token
k+1 places ahead from the base's last hidden state; accuracy k is its top-1 hit rate on the assistant tokens.
An EAGLE batch that carries `base_features` (stored by the features stage) trains offline: the base does not run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

IGNORE_INDEX = -100


def eagle_loss_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """ModelOpt weights position p by whether the base's prediction there (of token p+1) is an assistant token."""
    mask = torch.zeros_like(target_mask)
    mask[:, :-1] = target_mask[:, 1:]
    return mask


_MASK_CACHE_SHAPES = 8


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


# Algorithms whose training objective was corrected after drafts were trained with it; the train stage puts the
# revision into its fingerprint (only for algorithms listed, so the others keep their finished runs).
OBJECTIVE_REVISIONS = {"medusa": 2}  # 2: heads learn token t + 2 + k (they learned t + 1 + k)


def draft_forward(model, batch: dict[str, torch.Tensor], algorithm: str) -> tuple[torch.Tensor, list[float]]:
    """(loss, accuracy per TTT step or per Medusa head) for one micro batch; `model` may be a DeepSpeed engine."""
    if algorithm == "medusa":
        # ModelOpt's Medusa loss takes labels already shifted (labels[t] = the token after t) and shifts them by
        # 1 + k more for head k, so head k at position t learns token t + 2 + k: the one after the base's own
        # next token, which is what vLLM and TensorRT-LLM ask of it.
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
