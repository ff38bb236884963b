"""Stage `qat`: the training job again, from the quantized checkpoint, with the fake quantizers active, and the
report of how loss and per-step accuracy moved from the bf16 draft through PTQ to QAT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.pipeline.artifacts import BaseArtifact, DatasetArtifact, QatArtifact, QuantizeArtifact, TrainArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.plots import grouped_bar_plot
from draftsmith.recipe.schema import Recipe
from draftsmith.stages.train import TrainStage
from draftsmith.training.train_draft import train_draft

REPORT_FILE = "quantization_report.json"


def quantization_report(bf16: dict[str, float], ptq: dict[str, float], qat: dict[str, float] | None
                        ) -> dict[str, dict[str, float]]:
    """Validation metrics (loss, acc_stepK) of the three models, on the same validation batches."""
    def strip(metrics: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}

    report = {"bf16": strip(bf16), "ptq": strip(ptq)}
    if qat is not None:
        report["qat"] = strip(qat)
    return report


class QATStage(Stage):
    name = "qat"
    artifact = QatArtifact
    depends_on = ("base", "dataset", "train", "quantize")

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        return {"qat": recipe.quantization.qat.model_dump(mode="json"),
                "training": TrainStage().settings(recipe)}

    def run(self, ctx: StageContext, out_dir: Path) -> QatArtifact:
        recipe, quantized = ctx.recipe, ctx.input("quantize", QuantizeArtifact)
        qat = recipe.quantization.qat
        if quantized.quantization is None or qat.steps == 0:  # no quantization, or PTQ only
            return QatArtifact(draft_dir=quantized.draft_dir, steps=0, report=None)
        summary = train_draft(
            init_checkpoint=quantized.draft_dir, base_dir=ctx.input("base", BaseArtifact).model_dir,
            data_dir=ctx.input("dataset", DatasetArtifact).data_dir, settings=recipe.training, out_dir=out_dir,
            algorithm=recipe.draft.algorithm, run_id=ctx.mlflow_run_id, steps=qat.steps, lr=qat.lr,
            resume=recipe.training.resume,
        )
        # The trainer validates before its first step, so its initial metrics are the PTQ model's on the very
        # validation batches the bf16 training used at its end.
        report = quantization_report(ctx.input("train", TrainArtifact).metrics, summary["initial_metrics"],
                                     summary["metrics"])
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        tracking.log_dict(report, REPORT_FILE)
        for label, metrics in report.items():
            tracking.log_metrics({f"{label}/val_{k}": v for k, v in metrics.items()})
        plot = grouped_bar_plot(report, "Validation: bf16 -> PTQ -> QAT", out_dir / "plots" / "quantization.png")
        tracking.log_artifact(plot, artifact_path="plots")
        return QatArtifact(draft_dir=summary["draft"], steps=summary["steps"], report=report)
