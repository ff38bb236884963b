"""Micro batches of similar-length conversations, assigned to workers, in an order that is a pure function of
(seed, epoch, rank): a resumed run continues exactly where the killed one stopped, without repeating or
skipping a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

PAD_MULTIPLE = 8  # pad lengths to a multiple of 8: fewer distinct shapes, friendlier kernels


def plan_micro_batches(ids: Sequence[str], lengths: Sequence[int], *, micro_batch_size: int, world_size: int,
                       seed: int, shuffle: bool = True) -> list[list[list[str]]]:
    """Per worker, its micro batches (lists of conversation ids).

    Conversations are sorted by length so a micro batch pads little, grouped, the groups shuffled once with
    `seed`, and dealt round-robin to the workers; the tail that cannot give every worker a batch is dropped
    (every worker must step the same number of times).
    """
    order = sorted(range(len(ids)), key=lambda i: (lengths[i], ids[i]))
    groups = [[ids[i] for i in order[k:k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)]
    if groups and len(groups[-1]) < micro_batch_size and len(groups) > 1:
        groups.pop()  # a short last group would change the effective batch size
    if shuffle:
        perm = np.random.default_rng(seed).permutation(len(groups))
        groups = [groups[i] for i in perm]
    usable = len(groups) - len(groups) % world_size
    return [groups[r:usable:world_size] for r in range(world_size)]


def local_batch_order(num_local: int, *, seed: int, epoch: int, rank: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, rank]).permutation(num_local)


def micro_batch_sequence(num_local: int, *, start: int, seed: int, rank: int) -> Iterator[int]:
    """Indices into a worker's micro batches from its `start`-th micro step on, epoch after epoch."""
    index = start
    while True:
        epoch, position = divmod(index, num_local)
        yield int(local_batch_order(num_local, seed=seed, epoch=epoch, rank=rank)[position])
        index += 1


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `target_mask` (1 on assistant tokens) of one micro batch."""
    width = max(len(r["input_ids"]) for r in rows)
    width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(r["input_ids"]), dtype=torch.long)
        attention[i, :n] = 1
        target[i, :n] = torch.as_tensor(np.asarray(r["target_mask"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "target_mask": target}
