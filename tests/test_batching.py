"""The data order of draft training: deterministic, resumable mid-epoch, every batch once per epoch."""

from __future__ import annotations

import itertools

from draftsmith.training.batching import collate, micro_batch_sequence, plan_micro_batches


def test_plan_groups_similar_lengths_and_deals_equal_shares():
    ids = [f"c{i}" for i in range(23)]
    lengths = [(i * 37) % 101 for i in range(23)]
    plan = plan_micro_batches(ids, lengths, micro_batch_size=4, world_size=2, seed=3)
    assert len(plan[0]) == len(plan[1]) == 2  # 5 full groups, dealt 2 each: the odd one and the short tail drop
    by_id = dict(zip(ids, lengths, strict=True))
    for batch in itertools.chain(*plan):
        assert len(batch) == 4
        spread = max(by_id[c] for c in batch) - min(by_id[c] for c in batch)
        assert spread <= 40  # sorted by length before grouping, so a batch pads little
    assert plan == plan_micro_batches(ids, lengths, micro_batch_size=4, world_size=2, seed=3)


def test_resumed_sequence_continues_without_repeating_or_skipping():
    full = list(itertools.islice(micro_batch_sequence(7, start=0, seed=1, rank=0), 30))
    resumed = list(itertools.islice(micro_batch_sequence(7, start=12, seed=1, rank=0), 18))
    assert resumed == full[12:]
    for epoch in range(4):  # each epoch visits each of the worker's batches exactly once
        assert sorted(full[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    assert full[:7] != full[7:14]  # and reshuffles between epochs
    other_rank = list(itertools.islice(micro_batch_sequence(7, start=0, seed=1, rank=1), 7))
    assert other_rank != full[:7]


def test_collate_pads_right_to_a_multiple_of_eight():
    batch = collate([{"input_ids": [5, 6, 7], "target_mask": [0, 1, 1]},
                     {"input_ids": list(range(10)), "target_mask": [1] * 10}], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert batch["target_mask"][0, :3].tolist() == [0, 1, 1] and batch["target_mask"][0, 3:].sum() == 0
