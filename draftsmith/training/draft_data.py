"""Training data for the draft: conversations tokenized with the base's chat template in Ray Data, a loss mask
on the assistant tokens, a validation split, bad records quarantined, and the assistant-token histogram that
sizes EAGLE's draft vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data.aggregate import AggregateFnV2
from ray.data.block import BlockAccessor

from draftsmith.jsonl import write_jsonl
from draftsmith.synthesis.records import normalize_messages, raw_records, source_files
from draftsmith.training.layout import TRAIN_DIR, VALIDATION_DIR

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"
TOKEN_COUNTS_FILE = "assistant_token_counts.npy"
SUMMARY_FILE = "summary.json"


class DraftDataError(ValueError):
    """The training conversations cannot train a draft; the message says what is wrong with them."""


def split_of(conversation_id: str, validation_share: float) -> str:
    """Stable split by id: the same conversation lands on the same side in every run and at every scale."""
    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "little") / 2**64
    return "validation" if bucket < validation_share else "train"


class TokenizeFiles:
    """Ray Data UDF: a batch of file paths in, one row per conversation out (bad records carry `error`)."""

    def __init__(self, base_dir: str, max_seq_len: int, validation_share: float):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.max_seq_len, self.validation_share = max_seq_len, validation_share

    def _row(self, path: str, line: int, record: Any, raw: str) -> dict[str, Any]:
        row = {"source": f"{path}:{line}", "conversation_id": "", "input_ids": [], "target_mask": [],
               "num_tokens": 0, "num_targets": 0, "truncated": False, "split": "", "error": "", "record": ""}
        try:
            if record is None:
                raise ValueError(raw.partition("\x00")[2])
            if not isinstance(record, dict):
                raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
            messages = normalize_messages(record, "auto")
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise ValueError("no assistant turn with text: nothing for the draft to learn")
            try:
                out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
            except Exception as exc:  # the template's own errors (e.g. role order) name the problem
                raise ValueError(f"the base's chat template rejects it: {exc}") from None
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if not any(mask):
                raise ValueError("the chat template marks no assistant tokens ({% generation %} missing?)")
            row["truncated"] = len(ids) > self.max_seq_len
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
            if sum(mask[1:]) == 0:
                raise ValueError(f"no assistant token within the first {self.max_seq_len} tokens (training.max_seq_len)")
            cid = str(record.get("conversation_id") or record.get("id") or hashlib.sha256(
                json.dumps(messages).encode()).hexdigest()[:20])
            row.update(conversation_id=cid, input_ids=ids, target_mask=[int(m) for m in mask],
                       num_tokens=len(ids), num_targets=int(sum(mask)), split=split_of(cid, self.validation_share))
        except ValueError as exc:
            row.update(error=str(exc), record=raw.partition("\x00")[0].strip()[:2000])
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self._row(str(path), line, record, raw)
                for path in batch["path"] for line, record, raw in raw_records(Path(path))]
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


def _target_ids(batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {"target_ids": [np.asarray(ids)[np.asarray(mask, dtype=bool)]
                           for ids, mask in zip(batch["input_ids"], batch["target_mask"], strict=True)]}


class AssistantTokenHistogram(AggregateFnV2):
    """Counts of each token id over the assistant (target) tokens: what the draft must predict."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        super().__init__("assistant_token_counts", zero_factory=lambda: np.zeros(vocab_size, np.int64),
                         on="target_ids", ignore_nulls=True)

    def aggregate_block(self, block) -> np.ndarray:
        counts = np.zeros(self.vocab_size, np.int64)
        for ids in BlockAccessor.for_block(block).to_numpy("target_ids"):
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=self.vocab_size)[: self.vocab_size]
        return counts

    def combine(self, current: np.ndarray, new: np.ndarray) -> np.ndarray:
        return current + new


def prepare_training_data(sources: list[str], base_dir: str | Path, out_dir: Path, *, max_seq_len: int,
                          validation_share: float, max_bad_share: float, vocab_size: int) -> dict[str, Any]:
    """Tokenize every conversation file into OUT/train and OUT/validation (parquet) and count target tokens."""
    files = sorted({str(f.resolve()) for s in sources for f in source_files(s)})
    workers = max(1, min(len(files), 4))
    rows = ray.data.from_items([{"path": f} for f in files]).map_batches(
        TokenizeFiles, fn_constructor_args=(str(base_dir), max_seq_len, validation_share), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0.5,
    ).materialize()
    good = rows.filter(expr="error == ''").drop_columns(["error", "record"]).materialize()
    bad = rows.filter(expr="error != ''").select_columns(["source", "error", "record"]).take_all()
    write_jsonl(out_dir / QUARANTINE_FILE, ({"source": b["source"], "reason": b["error"], "record": b["record"]}
                                            for b in bad))
    total = rows.count()
    if total == 0:
        raise DraftDataError(f"the training data {sources} holds no conversations")
    usable = good.count()
    if usable == 0:
        reasons = sorted({b["error"] for b in bad})[:3]
        raise DraftDataError(f"none of the {total} training conversations is usable (see {out_dir / QUARANTINE_FILE}): "
                             f"{'; '.join(reasons)}")
    bad_share = len(bad) / total
    if bad_share > max_bad_share:
        raise DraftDataError(f"{len(bad)} of {total} training conversations are malformed ({bad_share:.1%} > "
                             f"data.max_bad_share={max_bad_share:.1%}); see {out_dir / QUARANTINE_FILE}")
    train = good.filter(expr="split == 'train'")
    validation = good.filter(expr="split == 'validation'")
    for split, rows_of_split in ((TRAIN_DIR, train), (VALIDATION_DIR, validation)):
        shutil.rmtree(out_dir / split, ignore_errors=True)  # write_parquet adds files beside an earlier attempt's
        rows_of_split.write_parquet(str(out_dir / split))
    n_train, n_val = train.count(), validation.count()
    if n_train == 0 or n_val == 0:
        raise DraftDataError(f"{usable} usable conversations split into {n_train} train / {n_val} validation; "
                             "add conversations or change training.validation_share")
    counts = train.map_batches(_target_ids, batch_format="numpy").aggregate(
        AssistantTokenHistogram(vocab_size))["assistant_token_counts"]
    np.save(out_dir / TOKEN_COUNTS_FILE, counts, allow_pickle=False)
    stats = good.sum(["num_tokens", "num_targets"])
    summary = {
        "files": len(files), "conversations": total, "usable": usable, "quarantined": len(bad),
        "bad_share": bad_share, "train": n_train, "validation": n_val,
        "truncated": good.filter(expr="truncated").count(),
        "tokens": int(stats["sum(num_tokens)"]), "target_tokens": int(stats["sum(num_targets)"]),
        "distinct_target_tokens": int((counts > 0).sum()),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    log.info("training data: %s", summary)
    return summary


def token_counts(data_dir: str | Path) -> np.ndarray:
    return np.load(Path(data_dir) / TOKEN_COUNTS_FILE, allow_pickle=False)
