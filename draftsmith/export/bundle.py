"""One export folder: draft variants, quantized base, engine configs and a manifest, written whole or not at all.

    EXPORT/manifest.json                      what is here, where it came from, the checks it passed
    EXPORT/draft/                             TensorRT-LLM's draft (ModelOpt aux-layer numbering)
    EXPORT/draft-vllm/                        vLLM's draft (aux ids + 1)
    EXPORT/draft-vllm-dequantized/            quantized drafts only: for vLLM's CPU build
    EXPORT/base/                              the quantized base (HF checkpoint + quantization config), if any
    EXPORT/trtllm/extra_llm_api_options.yaml  `trtllm-serve EXPORT/base --config ...`
    EXPORT/vllm/speculative_config.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Callable

from transformers import AutoConfig

from draftsmith.draft.algorithms import get_algorithm
from draftsmith.draft.checkpoint import WEIGHTS_FILE, read_meta
from draftsmith.export.draft_export import ExportError, export_draft
from draftsmith.export.engine_configs import relocate_engine_configs, relocated_engine_config, write_engine_configs
from draftsmith.export.manifest import MANIFEST, BaseModelRecord, DraftRecord, ExportManifest, read_manifest
from draftsmith.pipeline.artifacts import QuantizationInfo, RoundTrip
from draftsmith.recipe.schema import ExportSettings

QUANTIZED_BASE = "base"


def checkpoint_digest(checkpoint: Path) -> str:
    """Identifies the draft an export was made from (its tensors file)."""
    digest = hashlib.sha256()
    with open(Path(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_destination(out_dir: Path, digest: str) -> bool:
    """True when `out_dir` already holds this very export; ExportError when it holds another one."""
    if not out_dir.exists():
        return False
    if not (out_dir / MANIFEST).is_file():
        if any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} exists and is not an export; pick an empty or new folder")
        return False
    existing = read_manifest(out_dir)
    if existing.draft.checkpoint_digest != digest:
        raise ExportError(f"{out_dir} already holds the export of another draft (checkpoint "
                          f"{existing.draft.checkpoint_digest}, this one {digest}); pick another folder or "
                          "delete it")
    return True


def export_bundle(*, checkpoint: Path, base_dir: Path, base_hash: str, quantized_base_dir: Path | None,
                  settings: ExportSettings, out_dir: Path,
                  verify: Callable[[Path, ExportManifest], RoundTrip | None] | None = None) -> ExportManifest:
    """Export into a temporary sibling of `out_dir` and move it into place once every check passed.

    `verify(folder, manifest)` (the engine round trip) runs on the finished temporary folder; what it returns is
    recorded in the manifest, and an exception from it leaves nothing behind.
    """
    read_meta(checkpoint)  # a folder that is no draft checkpoint fails before anything is written
    digest = checkpoint_digest(checkpoint)
    if check_destination(out_dir, digest):
        return read_manifest(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        exported, meta = export_draft(checkpoint, base_dir, tmp, dtype=settings.dtype)
        algorithm = get_algorithm(meta.algorithm)
        checks = algorithm.check_export(tmp, exported, meta, AutoConfig.from_pretrained(str(base_dir)))
        if quantized_base_dir is not None:
            shutil.copytree(quantized_base_dir, tmp / QUANTIZED_BASE)
        first = next(iter(checks.values()))
        export_settings = settings.model_dump(mode="json")
        quantized_base = QUANTIZED_BASE if quantized_base_dir is not None else None
        manifest = ExportManifest(
            algorithm=algorithm.name,
            quantization=QuantizationInfo.model_validate(exported.quantization) if exported.quantization else None,
            base_model=BaseModelRecord(dir=Path(base_dir).resolve(), hash=base_hash),
            quantized_base=quantized_base,
            draft=DraftRecord(variants=exported.variants, checkpoint_digest=digest,
                              aux_layer_ids=first.get("aux_layer_ids"), checks=checks,
                              draft_vocab_size=meta.draft_vocab_size, medusa_heads=meta.medusa_heads,
                              block_size=meta.block_size, trained_steps=meta.trained_steps,
                              training_run_id=meta.training_run_id),
            export_settings=export_settings,
            export_digest=hashlib.sha256(json.dumps([digest, export_settings, quantized_base], sort_keys=True)
                                         .encode()).hexdigest()[:16],
        )
        written = write_engine_configs(tmp, manifest, settings)
        manifest = manifest.model_copy(update={
            "engine_configs": written,
            "engines_without_config": {t: algorithm.unsupported_reason(t) or "no draft variant for it"
                                       for t in settings.targets if t not in written}})
        if verify is not None:
            manifest = manifest.model_copy(update={"verification": verify(tmp, manifest)})
        manifest.write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    relocate_engine_configs(out_dir, manifest)  # they were written with the temporary folder's paths
    return manifest


def export_engine_config(export_dir: Path, target: str, device: str = "gpu") -> dict[str, Any] | None:
    """The engine config for an export wherever it is now (e.g. downloaded from the registry)."""
    return relocated_engine_config(Path(export_dir), read_manifest(export_dir), target, device=device)


def copy_export(export_dir: Path, destination: Path) -> Path:
    """Copy a finished export to `destination` (whole or not at all); refused when it holds another export."""
    manifest = read_manifest(export_dir)
    destination = Path(destination)
    if check_destination(destination, manifest.draft.checkpoint_digest):
        return destination
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export_dir, tmp)
    if destination.exists():
        destination.rmdir()  # empty: check_destination refused anything else
    os.replace(tmp, destination)
    relocate_engine_configs(destination, manifest)
    return destination
