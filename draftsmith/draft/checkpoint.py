"""Draft checkpoints: ModelOpt's state plus the tensors that are not the base's, restored onto the base folder.

A checkpoint folder holds `draft_meta.json` (algorithm, base fingerprint, step, quantization), `modelopt_state.pt`
(ModelOpt's record of the conversion and quantization, loaded with `weights_only=True`) and `draft.safetensors`
(the draft's weights and buffers, and quantizer scales when quantized). The frozen base is never copied: it is
read from its own folder, checked by fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from draftsmith.base_model import model_fingerprint
from draftsmith.draft.algorithms import get_algorithm
from draftsmith.draft.convert import TORCH_DTYPES, freeze_base, load_base

META_FILE = "draft_meta.json"
STATE_FILE = "modelopt_state.pt"
WEIGHTS_FILE = "draft.safetensors"
FORMAT = "draftsmith-draft/1"


class DraftCheckpointError(ValueError):
    """A folder is not a usable draft checkpoint for this recipe; the message says why."""


class DraftMeta(BaseModel):
    """`draft_meta.json`: which algorithm and base a checkpoint belongs to, how far it trained, how it was quantized,
    and the algorithm's own sizes (`DraftAlgorithm.meta`; None for the others')."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["draftsmith-draft/1"] = FORMAT
    algorithm: str
    base_model_dir: str
    base_model_hash: str
    step: int = 0  # steps of the training that wrote it
    trained_steps: int = 0  # steps since conversion, over every training (QAT continues the count)
    quantization: dict[str, Any] | None = None  # format, kv_cache, base, calibration_samples
    training_run_id: str | None = None
    ttt_steps: int | None = None  # EAGLE
    draft_vocab_size: int | None = None  # EAGLE-3 with a reduced vocabulary
    medusa_heads: int | None = None  # Medusa
    block_size: int | None = None  # DFlash


def draft_tensors(state_dict: dict[str, torch.Tensor], base_keys: set[str]) -> dict[str, torch.Tensor]:
    """Everything the conversion (and quantization) added to the base: draft weights, d2t, quantizer scales."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in base_keys}


def write_checkpoint(directory: Path, *, modelopt_state: dict, tensors: dict[str, torch.Tensor],
                     meta: DraftMeta) -> Path:
    """Write atomically: a sibling temporary folder renamed into place once complete."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(modelopt_state, tmp / STATE_FILE)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def save_draft(model: torch.nn.Module, directory: Path, *, base_keys: set[str], meta: DraftMeta) -> Path:
    import modelopt.torch.opt as mto

    return write_checkpoint(directory, modelopt_state=mto.modelopt_state(model),
                            tensors=draft_tensors(model.state_dict(), base_keys), meta=meta)


def read_meta(directory: str | Path) -> DraftMeta:
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise DraftCheckpointError(
            f"{directory} is not a draft checkpoint ({META_FILE} is missing); point at the `draft` folder that the "
            "convert or train stage wrote"
        )
    record = json.loads(meta_file.read_text())
    if record.get("format") != FORMAT:
        raise DraftCheckpointError(f"{meta_file}: format {record.get('format')!r}, expected {FORMAT!r}")
    try:
        meta = DraftMeta.model_validate(record)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise DraftCheckpointError(f"{meta_file}: key {'.'.join(map(str, problem['loc']))!r}: {problem['msg']} "
                                   "(written by another version of draftsmith?)") from None
    try:
        get_algorithm(meta.algorithm)
    except ValueError as exc:
        raise DraftCheckpointError(f"{meta_file}: {exc}") from None
    for name in (STATE_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise DraftCheckpointError(f"{directory} is an incomplete draft checkpoint: {name} is missing")
    return meta


def check_compatible(directory: str | Path, *, algorithm: str, base_dir: str | Path) -> DraftMeta:
    """Fail before any worker starts when the checkpoint belongs to another algorithm or another base."""
    meta = read_meta(directory)
    if meta.algorithm != algorithm:
        raise DraftCheckpointError(
            f"{directory} holds a {meta.algorithm} draft but the recipe trains draft.algorithm={algorithm}; "
            "set the algorithm to match or start from a new conversion"
        )
    fingerprint = model_fingerprint(base_dir)
    if meta.base_model_hash != fingerprint:
        raise DraftCheckpointError(
            f"{directory} was made for base {meta.base_model_hash} ({meta.base_model_dir}) but base.model "
            f"is {base_dir} ({fingerprint}); use the same base model"
        )
    return meta


@dataclass
class LoadedDraft:
    model: torch.nn.Module
    meta: DraftMeta
    base_keys: set[str]  # the base's own tensors, which a checkpoint never stores


def load_draft(directory: str | Path, base_dir: str | Path, *, dtype: str = "float32") -> LoadedDraft:
    """Rebuild the converted (and possibly quantized) model exactly: base weights, ModelOpt modes, draft tensors."""
    import modelopt.torch.opt as mto

    directory = Path(directory)
    meta = read_meta(directory)
    model = load_base(base_dir, TORCH_DTYPES[dtype])
    base_keys = set(model.state_dict())
    state = mto.load_modelopt_state(directory / STATE_FILE, weights_only=True)
    model = mto.restore_from_modelopt_state(model, modelopt_state=state)
    algorithm = get_algorithm(meta.algorithm)
    algorithm.prepare(model)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k not in base_keys]
    if missing or result.unexpected_keys:
        raise DraftCheckpointError(
            f"{directory / WEIGHTS_FILE} does not match the restored model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    prefix = algorithm.prefix
    if not any(k.startswith(prefix) for k in tensors):
        raise DraftCheckpointError(f"{directory} has no {prefix}* tensors: no speculative module in it")
    freeze_base(model, meta.algorithm)
    return LoadedDraft(model, meta, base_keys)

