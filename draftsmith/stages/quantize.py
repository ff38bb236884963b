"""Stage `quantize`: ModelOpt fake quantization (FP8 by default) of the trained draft and its base, calibrated on a
sample of the training conversations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from draftsmith import tracking
from draftsmith.pipeline.artifacts import BaseArtifact, DatasetArtifact, QuantizeArtifact, TrainArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.quantization.formats import check_format
from draftsmith.quantization.quantize_draft import SUMMARY_FILE, quantize_checkpoint
from draftsmith.recipe.schema import Recipe


class QuantizeStage(Stage):
    name = "quantize"
    artifact = QuantizeArtifact
    depends_on = ("base", "dataset", "train")

    def needs_ray(self, recipe: Recipe) -> bool:
        return recipe.training.use_gpu  # a Ray task with a GPU; on CPU it runs in this process

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        check_format(recipe.quantization.format, use_gpu=recipe.training.use_gpu)
        # The QAT settings belong to the next stage: changing them must not redo the calibration.
        return {**recipe.quantization.model_dump(mode="json", exclude={"qat"}),
                "micro_batch_size": recipe.training.micro_batch_size}

    def run(self, ctx: StageContext, out_dir: Path) -> QuantizeArtifact:
        recipe, train = ctx.recipe, ctx.input("train", TrainArtifact)
        if recipe.quantization.format == "none":  # nothing to do: the trained draft goes on as it is
            return QuantizeArtifact(draft_dir=train.draft_dir, quantized_base_dir=None, quantization=None)
        kwargs = dict(checkpoint=train.draft_dir, base_dir=ctx.input("base", BaseArtifact).model_dir,
                      data_dir=ctx.input("dataset", DatasetArtifact).data_dir, settings=recipe.quantization,
                      micro_batch_size=recipe.training.micro_batch_size,
                      validation_samples=recipe.training.validation_batches * recipe.training.micro_batch_size,
                      out_dir=out_dir)
        if recipe.training.use_gpu:  # calibrate where the GPUs are, not on the (possibly CPU-only) driver
            task = ray.remote(num_gpus=1)(quantize_checkpoint)
            result = ray.get(task.remote(**kwargs, device="cuda"))
        else:
            result = quantize_checkpoint(**kwargs)
        for label, metrics in result["validation"].items():
            tracking.log_metrics({f"{label}/val_{k}": v for k, v in metrics.items()})
        tracking.log_metrics({f"quantizers_{k}": v for k, v in result["quantizers"].items()})
        tracking.set_tags({"draftsmith.quantization": recipe.quantization.format})
        tracking.log_artifact(out_dir / SUMMARY_FILE)
        tracking.log_artifact(out_dir / "quantize_summary.json")
        return QuantizeArtifact.model_validate(result)
