"""Draft training data through Ray Data: tokenized with the chat template, bad records quarantined, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoConfig

from draftsmith.jsonl import read_jsonl
from draftsmith.training.draft_data import DraftDataError, prepare_training_data, token_counts
from draftsmith.training.layout import read_split


def _conversation(i: int) -> dict:
    return {"conversation_id": f"c{i}", "messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"So {i} + 1 = {i + 1}."}]}


def _prepare(tiny_base, tmp_path, lines: list[str], **kwargs):
    source = tmp_path / "conversations.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    vocab = AutoConfig.from_pretrained(tiny_base).vocab_size
    options = {"max_seq_len": 1024, "validation_share": 0.2, "max_bad_share": 0.5, "vocab_size": vocab}
    options.update(kwargs)
    return prepare_training_data([str(source)], tiny_base, tmp_path / "out", **options), source


def test_tokenizes_splits_and_quarantines(tiny_base, local_ray, tmp_path):
    good = [json.dumps(_conversation(i)) for i in range(40)]
    bad = ['{"messages": [', json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
           json.dumps({"messages": [{"role": "wizard", "content": "x"}]})]
    summary, source = _prepare(tiny_base, tmp_path, [*good[:20], *bad, *good[20:]])
    assert (summary["usable"], summary["quarantined"], summary["train"] + summary["validation"]) == (40, 3, 40)
    assert summary["validation"] > 0 and summary["train"] > summary["validation"]
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [q["source"] for q in quarantine] == [f"{source}:{n}" for n in (21, 22, 23)]  # file:line of each
    reasons = " | ".join(q["reason"] for q in quarantine)
    assert "invalid JSON" in reasons and "no assistant turn" in reasons and "unknown role 'wizard'" in reasons

    rows = read_split(tmp_path / "out", "train").to_pylist()
    row = rows[0]
    assert len(row["input_ids"]) == len(row["target_mask"]) == row["num_tokens"]
    assert 0 < sum(row["target_mask"]) < row["num_tokens"]  # only the assistant turn is a target
    counts = token_counts(tmp_path / "out")
    assert counts.sum() == sum(sum(r["target_mask"]) for r in rows)
    assert counts.shape == (AutoConfig.from_pretrained(tiny_base).vocab_size,)
    assert np.count_nonzero(counts) == summary["distinct_target_tokens"]

    # A re-run into the same folder (a stage killed after writing) replaces the splits instead of adding to them.
    again, _ = _prepare(tiny_base, tmp_path, [*good[:20], *bad, *good[20:]])
    assert read_split(tmp_path / "out", "train").num_rows == again["train"] == summary["train"]


def test_dataset_without_assistant_tokens_fails_clearly(tiny_base, local_ray, tmp_path):
    user_only = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(5)]
    with pytest.raises(DraftDataError, match="none of the 5 training conversations is usable.*no assistant turn"):
        _prepare(tiny_base, tmp_path, user_only)


def test_empty_dataset_fails_clearly(tiny_base, local_ray, tmp_path):
    with pytest.raises(DraftDataError, match="holds no conversations"):
        _prepare(tiny_base, tmp_path, [])


def test_too_many_bad_records_fail_after_quarantining_them(tiny_base, local_ray, tmp_path):
    lines = [json.dumps(_conversation(i)) for i in range(4)] + ["not json"] * 4
    with pytest.raises(DraftDataError, match=r"4 of 8 training conversations are malformed \(50.0% > "):
        _prepare(tiny_base, tmp_path, lines, max_bad_share=0.25)
    assert len(read_jsonl(tmp_path / "out" / "quarantine.jsonl")) == 4
