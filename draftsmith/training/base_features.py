"""Offline EAGLE training: the frozen base's features, computed once per conversation and stored, then read by the
trainer instead of running the base in every step.

What an EAGLE draft needs of the base at a position is its auxiliary hidden states (EAGLE-3: the outputs of the
fused layers, concatenated), its final hidden state (after the final norm: the target logits are the base's
`lm_head` of it) and the token embedding (recomputed from the ids: the embedding table stays in the model). The
store keeps the first two per token; Ray Data tasks (one using every core on CPU, one per GPU) compute them with
the base in the training precision and write one safetensors file per dataset part, atomically, so a killed run
resumes with the parts it has not written.

Storage per token is (aux layers + 1) x hidden values: bfloat16 (2 bytes each), or float8 e4m3 (1 byte) with one
float32 scale per token and segment (each aux layer and the final state scaled to its own absolute maximum, so
the base's outlier channels do not flush the rest to zero).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from draftsmith.draft.algorithms import get_algorithm, text_config
from draftsmith.pipeline.artifacts import FeatureStoreFigures, read_record
from draftsmith.recipe.schema import DraftSettings
from draftsmith.training.layout import TRAIN_DIR, VALIDATION_DIR, split_files

log = logging.getLogger(__name__)

FeatureDtype = Literal["bfloat16", "float8"]
MANIFEST_FILE = "features.json"
FORMAT = "draftsmith-base-features/1"
FP8_MAX = 448.0  # the largest finite float8 e4m3 value
FEATURE_BATCH_TOKENS = 8192  # rows per forward in the feature pass: as many as fit this many padded tokens
SPLITS = {"train": TRAIN_DIR, "validation": VALIDATION_DIR}
PROGRESS_EVERY_S = 30


class FeatureStoreError(ValueError):
    """A feature store does not match the draft or the data it is used with; the message says how to fix it."""


@dataclass(frozen=True)
class FeatureLayout:
    """Which base states a store holds: what the draft was converted to read."""

    aux_layer_ids: tuple[int, ...]  # ModelOpt's numbering: the output of layer j
    hidden_size: int
    dtype: FeatureDtype

    @property
    def segments(self) -> int:
        return len(self.aux_layer_ids) + 1  # the aux layers, then the final (normed) hidden state

    @property
    def bytes_per_token(self) -> int:
        values = self.segments * self.hidden_size
        return values * 2 if self.dtype == "bfloat16" else values + 4 * self.segments


def recipe_layout(draft: DraftSettings, base_config: Any, dtype: FeatureDtype) -> FeatureLayout:
    """The layout the recipe's draft reads, from the same sizing the conversion uses (EAGLE-1: the final hidden
    state alone)."""
    cfg = text_config(base_config)
    aux = get_algorithm(draft.algorithm).feature_layers(draft, cfg.num_hidden_layers)
    return FeatureLayout(aux, int(cfg.hidden_size), dtype)


def model_layout(model: torch.nn.Module, algorithm: str) -> tuple[tuple[int, ...], int]:
    """(aux layer ids, hidden size) that a converted model of `algorithm` reads."""
    module = getattr(model, "module", model)
    return get_algorithm(algorithm).model_feature_layers(module), int(module.config.hidden_size)


def encode(values: torch.Tensor, layout: FeatureLayout) -> dict[str, torch.Tensor]:
    """[tokens, segments * hidden] float -> the stored tensors."""
    if layout.dtype == "bfloat16":
        return {"features": values.to(torch.bfloat16).contiguous()}
    segments = values.float().view(values.shape[0], layout.segments, layout.hidden_size)
    scales = (segments.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [tokens, segments, 1]
    quantized = (segments / scales).to(torch.float8_e4m3fn)
    return {"features": quantized.view(values.shape[0], -1).contiguous(), "scales": scales.squeeze(-1).contiguous()}


def decode(features: torch.Tensor, scales: torch.Tensor | None, layout: FeatureLayout,
           dtype: torch.dtype) -> torch.Tensor:
    """The stored tensors of some tokens -> [tokens, segments * hidden] in `dtype`."""
    if scales is None:
        return features.to(dtype)
    segments = features.float().view(features.shape[0], layout.segments, layout.hidden_size)
    return (segments * scales.float().unsqueeze(-1)).view(features.shape[0], -1).to(dtype)


def base_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layout: FeatureLayout) -> torch.Tensor:
    """[batch, seq, segments * hidden]: the fused layers' outputs and the final normed hidden state, as the
    online forward gives them to the draft (hidden_states[j + 1] is layer j's output; the last is after the
    final norm)."""
    base = model._base_model if hasattr(model, "_base_model") else model.model
    with torch.no_grad():
        out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = [out.hidden_states[j + 1] for j in layout.aux_layer_ids] + [out.hidden_states[-1]]
    return torch.cat(states, dim=-1)


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def compute_part(model: torch.nn.Module, part: Path, out_path: Path, layout: FeatureLayout, pad_id: int) -> int:
    """Features of every row of one dataset part into one safetensors file; returns its token count."""
    import pyarrow.parquet as pq

    table = pq.read_table(part, columns=["source", "input_ids"])
    sources, rows = table["source"].to_pylist(), table["input_ids"].to_pylist()
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    device = next(model.parameters()).device
    stored: dict[str, torch.Tensor] | None = None
    order = np.argsort(lengths, kind="stable")
    start, logged = 0, time.perf_counter()
    while start < len(order):  # length-sorted batches under a padded-token budget
        if time.perf_counter() - logged > PROGRESS_EVERY_S:
            log.info("base features: %s, %d of %d conversations", out_path.name, start, len(order))
            logged = time.perf_counter()
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * int(lengths[order[stop]]) <= FEATURE_BATCH_TOKENS:
            stop += 1
        batch = order[start:stop]
        width = int(lengths[batch].max())
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : lengths[r]] = torch.as_tensor(rows[r])
            mask[i, : lengths[r]] = 1
        states = base_states(model, ids.to(device), mask.to(device), layout).cpu()
        for i, r in enumerate(batch):
            encoded = encode(states[i, : lengths[r]], layout)
            if stored is None:
                stored = {k: torch.empty((int(offsets[-1]), *v.shape[1:]), dtype=v.dtype) for k, v in encoded.items()}
            for k, v in encoded.items():
                stored[k][offsets[r]: offsets[r + 1]] = v
        start = stop
    assert stored is not None, f"{part} has no rows"
    stored["offsets"] = torch.from_numpy(offsets)
    _write_atomic(out_path, stored, {"sources": json.dumps(sources), "format": FORMAT})
    return int(offsets[-1])


def compute_parts(batch: dict[str, np.ndarray], *, base_dir: str, layout: dict[str, Any], dtype: str,
                  pad_id: int, workers: int, device: str) -> dict[str, list]:
    """Ray Data task: the features of a batch of dataset parts (skipping parts a killed run already wrote)."""
    from draftsmith.draft.convert import TORCH_DTYPES, load_base
    from draftsmith.engines.vllm_cpu import use_cores

    if not logging.getLogger().handlers:  # a Ray worker: its INFO lines (progress) reach the driver's output
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if device == "cpu":
        use_cores(workers)  # Ray gives a task OMP_NUM_THREADS=1: take this task's share of the cores
    feature_layout_ = FeatureLayout(tuple(layout["aux_layer_ids"]), layout["hidden_size"], layout["dtype"])
    model = None
    tokens, seconds = [], []
    for part, out in zip(batch["part"], batch["out"], strict=True):
        out_path = Path(str(out))
        if out_path.is_file():
            tokens.append(int(_read_offsets(out_path)[-1]))
            seconds.append(0.0)
            continue
        if model is None:
            model = load_base(base_dir, TORCH_DTYPES[dtype]).to(device).eval()
        started = time.perf_counter()
        tokens.append(compute_part(model, Path(str(part)), out_path, feature_layout_, pad_id))
        seconds.append(time.perf_counter() - started)
        log.info("base features: %s, %d tokens in %.0f s", out_path.name, tokens[-1], seconds[-1])
    return {"part": list(batch["part"]), "tokens": tokens, "seconds": seconds}


def _read_offsets(path: Path) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("offsets").numpy()


def build_feature_store(*, base_dir: str | Path, data_dir: str | Path, out_dir: Path, layout: FeatureLayout,
                        compute_dtype: str, pad_id: int, gpus: int = 0) -> FeatureStoreManifest:
    """Every dataset part's features into OUT/<split>/, on Ray Data tasks; returns the manifest (also written).

    On CPU one task computes every part with all the cores (the base loads once, and the parts are of very
    unequal sizes: the validation split's are a twentieth of the training split's); with `gpus`, a task per GPU.
    """
    import ray

    jobs = []
    for split, folder in SPLITS.items():
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        for part in split_files(data_dir, split):
            jobs.append({"part": part, "out": str(out_dir / folder / (Path(part).stem + ".safetensors"))})
    if not jobs:
        raise FeatureStoreError(f"{data_dir} holds no dataset parts to compute base features for")
    workers = max(1, min(gpus, len(jobs)))
    started = time.perf_counter()
    settings = {"base_dir": str(base_dir), "layout": {"aux_layer_ids": list(layout.aux_layer_ids),
                                                      "hidden_size": layout.hidden_size, "dtype": layout.dtype},
                "dtype": compute_dtype, "pad_id": pad_id, "workers": workers, "device": "cuda" if gpus else "cpu"}
    done = ray.data.from_items(jobs).map_batches(
        compute_parts, fn_kwargs=settings, batch_size=-(-len(jobs) // workers), concurrency=workers,
        **({"num_gpus": 1} if gpus else {"num_cpus": 0.5}),
    ).take_all()
    tokens = sum(int(d["tokens"]) for d in done)
    stored = sum(Path(j["out"]).stat().st_size for j in jobs)
    values = layout.segments * layout.hidden_size
    manifest = FeatureStoreManifest(
        aux_layer_ids=list(layout.aux_layer_ids), hidden_size=layout.hidden_size, dtype=layout.dtype,
        compute_dtype=compute_dtype, parts=len(jobs), tokens=tokens, bytes=stored,
        bytes_per_token=stored / max(1, tokens), bytes_per_token_bfloat16=values * 2,
        bytes_per_token_float32=values * 4, compute_seconds=sum(float(d["seconds"]) for d in done),
        wall_seconds=time.perf_counter() - started)
    (out_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    log.info("base features: %d tokens, %.0f bytes per token (%s; bfloat16 would be %d, float32 %d), %.0f s",
             tokens, manifest.bytes_per_token, layout.dtype, values * 2, values * 4, manifest.wall_seconds)
    return manifest


class FeatureStoreManifest(FeatureStoreFigures):
    """`features.json`: which base states the store holds, how they are stored, and what computing them cost."""

    format: Literal["draftsmith-base-features/1"] = FORMAT


def read_manifest(features_dir: str | Path) -> FeatureStoreManifest:
    path = Path(features_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FeatureStoreError(f"{features_dir} is not a finished feature store ({MANIFEST_FILE} is missing); "
                                "re-run the features stage")
    return read_record(path, FeatureStoreManifest, FORMAT, FeatureStoreError, "re-run the features stage")


def check_store_fits(features_dir: str | Path, reads: tuple[tuple[int, ...], int]) -> None:
    """Fail before training when the store holds other states than the draft reads ((aux ids, hidden size))."""
    manifest = read_manifest(features_dir)
    stored = (tuple(manifest.aux_layer_ids), manifest.hidden_size)
    if stored != (tuple(reads[0]), reads[1]):
        raise FeatureStoreError(
            f"{features_dir} holds aux layers {list(stored[0])} of hidden size {stored[1]}, but the draft reads "
            f"aux layers {list(reads[0])} of hidden size {reads[1]}; re-run the features stage for this draft"
        )


class FeatureReader:
    """The stored features of one split, by a row's `source` key, read lazily from memory-mapped files."""

    def __init__(self, features_dir: str | Path, split: str, dtype: torch.dtype):
        from safetensors import safe_open

        manifest = read_manifest(features_dir)
        self.layout = FeatureLayout(tuple(manifest.aux_layer_ids), manifest.hidden_size, manifest.dtype)
        self.dtype = dtype
        self._files = []
        self._index: dict[str, tuple[int, int, int]] = {}
        for path in sorted((Path(features_dir) / SPLITS[split]).glob("*.safetensors")):
            handle = safe_open(str(path), "pt")
            offsets = handle.get_tensor("offsets").tolist()
            for i, source in enumerate(json.loads(handle.metadata()["sources"])):
                self._index[source] = (len(self._files), offsets[i], offsets[i + 1])
            self._files.append(handle)

    def num_tokens(self, source: str) -> int | None:
        """How many tokens the store holds for a conversation (None: not in the store)."""
        if source not in self._index:
            return None
        _, start, stop = self._index[source]
        return stop - start

    def get(self, source: str) -> torch.Tensor:
        """[tokens, segments * hidden] of one conversation."""
        file, start, stop = self._index[source]
        handle = self._files[file]
        features = handle.get_slice("features")[start:stop]
        scales = handle.get_slice("scales")[start:stop] if self.layout.dtype == "float8" else None
        return decode(features, scales, self.layout, self.dtype)

    def batch(self, sources: list[str], width: int) -> torch.Tensor:
        """[rows, width, segments * hidden], zero past each conversation's end (the padding the mask hides)."""
        values = self.layout.segments * self.layout.hidden_size
        out = torch.zeros((len(sources), width, values), dtype=self.dtype)
        for i, source in enumerate(sources):
            states = self.get(source)
            out[i, : states.shape[0]] = states
        return out
