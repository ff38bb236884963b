"""Stage `evaluate`: the exported draft through vLLM on the recipe's prompt sets (acceptance length, tokens/s
against the base and n-gram speculation, greedy equality), as a report, plots and MLflow metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from draftsmith.evaluation.evaluate import evaluate_draft, from_export
from draftsmith.evaluation.gate import engine_dtype
from draftsmith.evaluation.measure import DRAFT
from draftsmith.pipeline.artifacts import BaseArtifact, EvaluationArtifact, ExportArtifact, PromptsArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe

log = logging.getLogger(__name__)

GATE_FIELDS = {"gate", "gate_set", "gate_margin", "gate_limit"}  # the register stage's business


def eval_device(recipe: Recipe) -> str:
    return "gpu" if recipe.training.use_gpu else "cpu"


def heldout_prompts(ctx: StageContext) -> Path | None:
    """The prompts stage's held-out prompts (a prompt set with no path), if it has any."""
    return ctx.input("prompts", PromptsArtifact).heldout


class EvaluateStage(Stage):
    name = "evaluate"
    artifact = EvaluationArtifact
    depends_on = ("base", "prompts", "export")

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # vLLM in child processes

    def settings(self, recipe: Recipe) -> Any:
        return {"evaluation": recipe.evaluation.model_dump(mode="json", exclude=GATE_FIELDS),
                "device": eval_device(recipe)}

    def run(self, ctx: StageContext, out_dir: Path) -> EvaluationArtifact:
        draft = from_export(ctx.input("export", ExportArtifact).export_dir, ctx.input("base", BaseArtifact).model_dir)
        draft.heldout = heldout_prompts(ctx)
        report = evaluate_draft(draft, ctx.recipe.evaluation, out_dir, device=eval_device(ctx.recipe),
                                vllm=ctx.recipe.vllm)
        greedy = [r for r in report["rows"] if r["temperature"] == 0]
        not_identical = [r["set"] for r in greedy if not r[DRAFT].get("greedy_identical", True)]
        if not_identical:
            exact = engine_dtype(eval_device(ctx.recipe), ctx.recipe.vllm) == "float32"
            log.warning("greedy output with the draft differs from the base's on %s; %s", not_identical,
                        "the promotion gate will refuse this version (the engine computes in float32)" if exact else
                        "in bfloat16 verification rounds differently from one-token decoding, so the gate reports "
                        "it and relies on the export's float32 round trip")
        return EvaluationArtifact(
            report=out_dir / "evaluation.json", markdown=out_dir / "evaluation.md",
            acceptance_length={f"{r['set']}@t={r['temperature']:g}": r[DRAFT]["acceptance_length"]
                               for r in report["rows"]},
            greedy_identical=not not_identical)
