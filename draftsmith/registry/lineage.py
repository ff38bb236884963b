"""Lineage tags of a registered version: which base, data, runs, code and settings produced it."""

from __future__ import annotations

from typing import Any

from draftsmith.pipeline.artifacts import BaseArtifact, DatasetArtifact, ExportArtifact, QuantizeArtifact
from draftsmith.pipeline.stage import StageResult, output_of
from draftsmith.provenance import git_commit
from draftsmith.recipe.loader import settings_hash
from draftsmith.recipe.schema import Recipe


def lineage_tags(recipe: Recipe, upstream: dict[str, StageResult]) -> dict[str, str]:
    base, dataset = output_of(upstream, "base", BaseArtifact), output_of(upstream, "dataset", DatasetArtifact)
    export = output_of(upstream, "export", ExportArtifact)
    quantization = output_of(upstream, "quantize", QuantizeArtifact).quantization
    tags: dict[str, Any] = {
        "draftsmith.base_model": recipe.base.model, "draftsmith.base_model_dir": base.model_dir,
        "draftsmith.base_model_hash": base.model_hash,
        "draftsmith.dataset.dir": dataset.data_dir, "draftsmith.dataset.train": dataset.train,
        "draftsmith.dataset.validation": dataset.validation, "draftsmith.dataset.quarantined": dataset.quarantined,
        "draftsmith.algorithm": recipe.draft.algorithm,
        "draftsmith.quantization": quantization.format if quantization else "none",
        "draftsmith.kv_cache_quantized": bool(quantization and quantization.kv_cache),
        "draftsmith.git_commit": git_commit(), "draftsmith.recipe": recipe.name,
        "draftsmith.recipe_hash": settings_hash(recipe), "draftsmith.export_dir": export.export_dir,
    }
    for stage in ("synthesize", "train", "quantize", "qat", "export"):
        if stage in upstream and upstream[stage].mlflow_run_id:
            tags[f"draftsmith.run.{stage}"] = upstream[stage].mlflow_run_id
    verification = export.verification
    if verification is not None and verification.acceptance_length is not None:
        tags["draftsmith.roundtrip_acceptance_length"] = f"{verification.acceptance_length:.3f}"
        tags["draftsmith.roundtrip_identical"] = verification.identical
    return {k: str(v) for k, v in tags.items()}
