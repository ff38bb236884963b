"""Stage `dataset`: the synthesized conversations tokenized for draft training (Ray Data), split and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from draftsmith import tracking
from draftsmith.draft.algorithms import text_config
from draftsmith.pipeline.artifacts import BaseArtifact, DatasetArtifact, SynthesisArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.training.draft_data import QUARANTINE_FILE, SUMMARY_FILE, prepare_training_data


class DatasetStage(Stage):
    name = "dataset"
    artifact = DatasetArtifact
    version = 2  # a re-run replaces the parquet splits instead of adding to them
    depends_on = ("base", "synthesize")

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        return {"max_seq_len": recipe.training.max_seq_len, "validation_share": recipe.training.validation_share}

    def run(self, ctx: StageContext, out_dir: Path) -> DatasetArtifact:
        base_dir = str(ctx.input("base", BaseArtifact).model_dir)
        sources = [str(ctx.input("synthesize", SynthesisArtifact).output_dir)]
        vocab_size = text_config(AutoConfig.from_pretrained(base_dir)).vocab_size
        summary = prepare_training_data(
            sources, base_dir, out_dir, max_seq_len=ctx.recipe.training.max_seq_len,
            validation_share=ctx.recipe.training.validation_share, max_bad_share=ctx.recipe.data.max_bad_share,
            vocab_size=vocab_size)
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        tracking.log_artifact(out_dir / SUMMARY_FILE)
        tracking.log_artifact(out_dir / QUARANTINE_FILE)
        return DatasetArtifact(data_dir=out_dir.resolve(), **summary)
