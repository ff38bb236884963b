"""Tokenize chat conversations with the chat template and pack them into fixed-length training rows."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 on tokens the model must produce, the closing EOS included)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert len(ids) == len(mask)
    return ids, mask


def pack_conversations(
    tokenizer, conversations: Iterable[list[dict[str, str]]], seq_len: int
) -> dict[str, np.ndarray]:
    """Greedy packing into rows of `seq_len`: whole conversations only, padding at the row ends.

    Returns `input_ids` [rows, seq_len], `labels` [rows, seq_len] (IGNORE_INDEX off the assistant tokens and on
    padding) and `position_ids` [rows, seq_len] restarting at 0 for each conversation, so a packed row sees the
    same positions as a conversation served alone.
    """
    pad_id = tokenizer.pad_token_id
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    skipped = 0

    def flush() -> None:
        pad = seq_len - len(cur_ids)
        rows_ids.append(cur_ids + [pad_id] * pad)
        rows_labels.append(cur_labels + [IGNORE_INDEX] * pad)
        rows_pos.append(cur_pos + [0] * pad)

    for messages in conversations:
        ids, mask = tokenize_conversation(tokenizer, messages)
        if len(ids) > seq_len:
            skipped += 1
            continue
        if len(cur_ids) + len(ids) > seq_len:
            flush()
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids += ids
        cur_labels += [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        cur_pos += list(range(len(ids)))
    if cur_ids:
        flush()
    if not rows_ids:
        raise ValueError(f"no conversation fits in seq_len={seq_len} ({skipped} were longer); raise seq_len")
    return {
        "input_ids": np.asarray(rows_ids, dtype=np.int64),
        "labels": np.asarray(rows_labels, dtype=np.int64),
        "position_ids": np.asarray(rows_pos, dtype=np.int64),
    }
