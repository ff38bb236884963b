"""The layout of a tokenized dataset folder (the `dataset` stage's output) and its one reader, importable without
Ray: the trainer's driver and workers, the quantize stage and the GPU check read it the same way.

The splits are read straight from their Parquet files, not through Ray Data: the run folder is storage every Ray
Train worker reads anyway (the checkpoint and the base come from it), the rows are a few MB of token ids, and on
2 cores each Ray Data execution of a split cost 15-45 s of task start-up (about 100 s of every training)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

TRAIN_DIR = "train"  # parquet files of rows {source, input_ids, target_mask, num_tokens, ...}
VALIDATION_DIR = "validation"
SPLIT_COLUMNS = ("source", "input_ids", "target_mask", "num_tokens")


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """The split's Parquet files in name order (a deterministic row order)."""
    folder = Path(data_dir) / (TRAIN_DIR if split == "train" else VALIDATION_DIR)
    return sorted(str(p) for p in folder.glob("*.parquet"))


def read_split(data_dir: str | Path, split: str, columns: Sequence[str] = SPLIT_COLUMNS, *,
               sources: Iterable[str] | None = None, limit: int | None = None) -> pa.Table:
    """Rows of one split: all, those whose `source` (the `file:line` key) is in `sources`, or the first `limit`."""
    dataset = pads.dataset(split_files(data_dir, split), format="parquet")
    if limit is not None:
        return dataset.head(limit, columns=list(columns))
    wanted = None if sources is None else pads.field("source").isin(pa.array(sorted(set(sources)), pa.string()))
    return dataset.to_table(columns=list(columns), filter=wanted)
