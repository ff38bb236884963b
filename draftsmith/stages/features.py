"""Stage `features`: the frozen base's states for every training conversation, computed once on Ray Data and
stored, so that training (`training.base_features: offline`) reads them instead of running the base each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from draftsmith import tracking
from draftsmith.pipeline.artifacts import BaseArtifact, DatasetArtifact, FeaturesArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.training.base_features import MANIFEST_FILE, build_feature_store, recipe_layout

STORE_DIR = "store"


class FeaturesStage(Stage):
    name = "features"
    artifact = FeaturesArtifact
    depends_on = ("base", "dataset")

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.training.base_features == "offline"

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        training, eagle = recipe.training, recipe.draft.eagle
        return {"algorithm": recipe.draft.algorithm, "aux_hidden_state_layer_ids": eagle.aux_hidden_state_layer_ids,
                "dtype": training.feature_dtype, "compute_precision": training.precision}

    def run(self, ctx: StageContext, out_dir: Path) -> FeaturesArtifact:
        recipe, base_dir = ctx.recipe, str(ctx.input("base", BaseArtifact).model_dir)
        layout = recipe_layout(recipe.draft, AutoConfig.from_pretrained(base_dir),
                               recipe.training.feature_dtype)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        store = out_dir / STORE_DIR
        manifest = build_feature_store(
            base_dir=base_dir, data_dir=ctx.input("dataset", DatasetArtifact).data_dir, out_dir=store, layout=layout,
            compute_dtype="bfloat16" if recipe.training.precision == "bf16" else "float32", pad_id=pad_id,
            gpus=recipe.training.num_workers if recipe.training.use_gpu else 0)
        tracking.log_metrics({k: float(v) for k, v in manifest.model_dump().items()
                              if k in ("tokens", "bytes", "bytes_per_token", "bytes_per_token_bfloat16",
                                       "compute_seconds", "wall_seconds")})
        tracking.log_artifact(store / MANIFEST_FILE)
        return FeaturesArtifact(features_dir=store.resolve(), **manifest.model_dump(exclude={"format"}))
