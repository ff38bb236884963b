"""Stage `train`: the draft trained on the conversations with Ray Train + DeepSpeed, from the converted checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.draft.algorithms import get_algorithm
from draftsmith.pipeline.artifacts import (BaseArtifact, ConvertArtifact, DatasetArtifact, FeaturesArtifact,
                                           TrainArtifact)
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.training.train_draft import train_draft


def features_dir(ctx: StageContext) -> Path | None:
    """The features stage's store when the recipe trains offline, else None (the base runs in every step)."""
    features = ctx.optional_input("features", FeaturesArtifact)
    return features.features_dir if features is not None else None


class TrainStage(Stage):
    name = "train"
    artifact = TrainArtifact
    depends_on = ("base", "dataset", "convert")
    optional_inputs = ("features",)  # offline training: the stored base states (their fingerprint covers them)

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        # How often to log or keep checkpoints, failures tolerated and the resume policy do not change the result;
        # offline features do not either (the same states), and their store's fingerprint is an input when used;
        # nor does the loss kernel (the same objective, to rounding: tests/test_kernels.py).
        settings = recipe.training.model_dump(mode="json", exclude={"log_every", "keep_checkpoints", "max_failures",
                                                                    "resume", "base_features", "feature_dtype",
                                                                    "loss_kernel"})
        revision = get_algorithm(recipe.draft.algorithm).objective_revision
        return settings if revision is None else {**settings, "objective_revision": revision}

    def run(self, ctx: StageContext, out_dir: Path) -> TrainArtifact:
        summary = train_draft(
            init_checkpoint=ctx.input("convert", ConvertArtifact).draft_dir,
            base_dir=ctx.input("base", BaseArtifact).model_dir,
            data_dir=ctx.input("dataset", DatasetArtifact).data_dir,
            settings=ctx.recipe.training, out_dir=out_dir, algorithm=ctx.recipe.draft.algorithm,
            run_id=ctx.mlflow_run_id,
            resume=ctx.recipe.training.resume, features_dir=features_dir(ctx),
        )
        final = {k.replace("/", "_"): v for k, v in summary["metrics"].items()}
        tracking.log_metrics({f"final_{k}": v for k, v in final.items()})
        return TrainArtifact(draft_dir=summary["draft"], steps=summary["steps"], resumed_from=summary["resumed_from"],
                             metrics=summary["metrics"], base_features=summary["base_features"])
