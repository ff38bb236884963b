"""Training data for the draft: conversations tokenized with the base's chat template in Ray Data, a loss mask
on the assistant tokens, a validation split, bad records quarantined, and the assistant-token histogram that
sizes EAGLE's draft vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from draftsmith.jsonl import write_jsonl
from draftsmith.synthesis.records import normalize_messages, raw_records, source_files
from draftsmith.training.assistant_mask import ChatTemplateMaskError, assistant_mask
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


# A split's rows as written (layout.SPLIT_COLUMNS are what the trainer reads of them).
ROW_SCHEMA = pa.schema([("source", pa.string()), ("conversation_id", pa.string()),
                        ("input_ids", pa.list_(pa.int64())), ("target_mask", pa.list_(pa.int64())),
                        ("num_tokens", pa.int64()), ("num_targets", pa.int64()), ("truncated", pa.bool_()),
                        ("split", pa.string())])


@functools.lru_cache(maxsize=4)
def _tokenizer(base_dir: str, stamp: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def _tokenizer_stamp(base_dir: str) -> tuple:
    """What the cached tokenizer is keyed on besides its folder: its files' sizes and times."""
    folder = Path(base_dir)
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("tokenizer*")))


def _generation_eos_ids(base_dir: str) -> list[int]:
    """The end-of-turn ids the base stops on (generation_config.json), beside its tokenizer's EOS."""
    config = Path(base_dir) / "generation_config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _truncated_turns(record: dict[str, Any]) -> list[bool]:
    """Per assistant turn, whether synthesis cut it at its token limit (its `stats`; other data has none)."""
    turns = (record.get("stats") or {}).get("turns") or []
    return [isinstance(t, dict) and t.get("finish_reason") == "length" for t in turns]


def tokenize_files(batch: dict[str, np.ndarray], **settings: Any) -> dict[str, list]:
    """Ray Data task: TokenizeFiles on one batch of paths. A task rather than an actor pool: Ray keeps a task's
    worker process (its transformers import, its tokenizer) for the next execution of the same job, where an
    actor's process exits with it (each execution paid 15 s of actor start-up on 2 cores)."""
    return TokenizeFiles(**settings)(batch)


class TokenizeFiles:
    """A batch of file paths in, one summary row per file out; the file's tokenized conversations go straight to
    the splits' Parquet folders (bad records to the summary, for the quarantine)."""

    def __init__(self, base_dir: str, max_seq_len: int, validation_share: float, out_dir: str, vocab_size: int):
        self.tokenizer = _tokenizer(base_dir, _tokenizer_stamp(base_dir))
        self.eos_token_ids = _generation_eos_ids(base_dir)
        self.max_seq_len, self.validation_share = max_seq_len, validation_share
        self.out_dir, self.vocab_size = Path(out_dir), vocab_size

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
                ids, mask = assistant_mask(self.tokenizer, messages, self.eos_token_ids, _truncated_turns(record))
            except ChatTemplateMaskError:
                raise
            except Exception as exc:  # the template's own errors (e.g. role order) name the problem
                raise ValueError(f"the base's chat template rejects it: {exc}") from None
            if not any(mask):
                raise ValueError("the chat template marks no assistant tokens")
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
        summaries = [self._file(str(path)) for path in batch["path"]]
        return {key: [s[key] for s in summaries] for key in summaries[0]}

    def _file(self, path: str) -> dict[str, Any]:
        """Tokenize one file, write its rows as one Parquet part per split, and summarize it for the driver."""
        rows = [self._row(path, line, record, raw) for line, record, raw in raw_records(Path(path))]
        good = [r for r in rows if not r["error"]]
        part = f"part-{hashlib.sha256(path.encode()).hexdigest()[:16]}.parquet"  # the same name on a re-run
        for split, folder in (("train", TRAIN_DIR), ("validation", VALIDATION_DIR)):
            of_split = [{name: r[name] for name in ROW_SCHEMA.names} for r in good if r["split"] == split]
            if of_split:
                pq.write_table(pa.Table.from_pylist(of_split, schema=ROW_SCHEMA), self.out_dir / folder / part)
        counts = np.zeros(self.vocab_size, np.int64)
        for r in good:
            if r["split"] == "train":
                targets = np.asarray(r["input_ids"], np.int64)[np.asarray(r["target_mask"], bool)]
                counts += np.bincount(targets, minlength=self.vocab_size)[: self.vocab_size]
        bad = [{"source": r["source"], "reason": r["error"], "record": r["record"]} for r in rows if r["error"]]
        return {"path": path, "conversations": len(rows), "quarantined": json.dumps(bad),
                "train": sum(r["split"] == "train" for r in good),
                "validation": sum(r["split"] == "validation" for r in good),
                "truncated": sum(r["truncated"] for r in good), "tokens": sum(r["num_tokens"] for r in good),
                "target_tokens": sum(r["num_targets"] for r in good), "train_token_counts": counts}


def prepare_training_data(sources: list[str], base_dir: str | Path, out_dir: Path, *, max_seq_len: int,
                          validation_share: float, max_bad_share: float, vocab_size: int) -> dict[str, Any]:
    """Tokenize every conversation file into OUT/train and OUT/validation (parquet) and count target tokens.

    One Ray Data execution: tasks over the files, each writing its files' rows itself and handing back a summary
    per file. (Tokenizing into a dataset and then filtering, writing, counting and aggregating it
    took nine executions, 45 s for 40 conversations on 2 cores, where each execution's start-up is the cost.)"""
    files = sorted({str(f.resolve()) for s in sources for f in source_files(s)})
    for folder in (TRAIN_DIR, VALIDATION_DIR):  # a killed earlier attempt's parts must not add to this one's
        shutil.rmtree(out_dir / folder, ignore_errors=True)
        (out_dir / folder).mkdir(parents=True)
    workers = max(1, min(len(files), 4))
    settings = {"base_dir": str(base_dir), "max_seq_len": max_seq_len, "validation_share": validation_share,
                "out_dir": str(out_dir), "vocab_size": vocab_size}
    per_file = ray.data.from_items([{"path": f} for f in files]).map_batches(
        tokenize_files, fn_kwargs=settings, batch_size=1, concurrency=workers, num_cpus=0.5,
    ).take_all() if files else []
    per_file.sort(key=lambda f: f["path"])
    bad = [b for f in per_file for b in json.loads(f["quarantined"])]
    write_jsonl(out_dir / QUARANTINE_FILE, bad)
    total = sum(int(f["conversations"]) for f in per_file)
    if total == 0:
        raise DraftDataError(f"the training data {sources} holds no conversations")
    usable = total - len(bad)
    if usable == 0:
        reasons = sorted({b["reason"] for b in bad})[:3]
        raise DraftDataError(f"none of the {total} training conversations is usable (see {out_dir / QUARANTINE_FILE}): "
                             f"{'; '.join(reasons)}")
    bad_share = len(bad) / total
    if bad_share > max_bad_share:
        raise DraftDataError(f"{len(bad)} of {total} training conversations are malformed ({bad_share:.1%} > "
                             f"data.max_bad_share={max_bad_share:.1%}); see {out_dir / QUARANTINE_FILE}")
    n_train, n_val = (sum(int(f[key]) for f in per_file) for key in ("train", "validation"))
    if n_train == 0 or n_val == 0:
        raise DraftDataError(f"{usable} usable conversations split into {n_train} train / {n_val} validation; "
                             "add conversations or change training.validation_share")
    counts = np.sum([np.asarray(f["train_token_counts"], np.int64) for f in per_file], axis=0)
    np.save(out_dir / TOKEN_COUNTS_FILE, counts, allow_pickle=False)
    summary = {
        "files": len(files), "conversations": total, "usable": usable, "quarantined": len(bad),
        "bad_share": bad_share, "train": n_train, "validation": n_val,
        **{key: sum(int(f[key]) for f in per_file) for key in ("truncated", "tokens", "target_tokens")},
        "distinct_target_tokens": int((counts > 0).sum()),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    log.info("training data: %s", summary)
    return summary


def token_counts(data_dir: str | Path) -> np.ndarray:
    return np.load(Path(data_dir) / TOKEN_COUNTS_FILE, allow_pickle=False)
