"""Stage `register`: the export as a new version of the recipe's registered model (pyfunc + lineage tags), then
the promotion gate decides whether it replaces the champion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from draftsmith import tracking
from draftsmith.evaluation.evaluate import from_export
from draftsmith.evaluation.gate import promotion_gate
from draftsmith.pipeline.artifacts import BaseArtifact, ExportArtifact, GateOutcome, RegistrationArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.registry.lineage import lineage_tags
from draftsmith.registry.register import check_registry_name, register_export
from draftsmith.stages.evaluate import eval_device, heldout_prompts

RECIPE_FILE = "recipe.yaml"


class RegisterStage(Stage):
    name = "register"
    artifact = RegistrationArtifact
    version = 2  # the promotion gate
    depends_on = ("base", "prompts", "dataset", "synthesize", "train", "quantize", "qat", "export", "evaluate")

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # MLflow, and vLLM in child processes for the gate

    def settings(self, recipe: Recipe) -> Any:
        evaluation = recipe.evaluation
        gate = None
        if evaluation.gate:
            gate_set = next(s for s in evaluation.prompt_sets if s.name == evaluation.gate_set)
            gate = {"set": gate_set.model_dump(mode="json"), "margin": evaluation.gate_margin,
                    "limit": evaluation.gate_limit, "num_speculative_tokens": evaluation.num_speculative_tokens,
                    "max_tokens": evaluation.max_tokens, "baselines": list(evaluation.gate_baselines)}
        return {"registry_name": recipe.tracking.registry_name, "bundle_base": recipe.tracking.bundle_base,
                "alias": None if gate else recipe.tracking.new_version_alias, "gate": gate}

    def preflight(self, recipe: Recipe) -> None:
        check_registry_name(recipe.tracking.registry_name, recipe.draft.algorithm)

    def run(self, ctx: StageContext, out_dir: Path) -> RegistrationArtifact:
        recipe = ctx.recipe
        recipe_file = out_dir / RECIPE_FILE
        recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        export_dir = ctx.input("export", ExportArtifact).export_dir
        base_dir = ctx.input("base", BaseArtifact).model_dir
        result = register_export(
            name=recipe.tracking.registry_name, export_dir=export_dir, base_dir=base_dir, recipe_file=recipe_file,
            tags=lineage_tags(recipe, ctx.upstream),
            alias=None if recipe.evaluation.gate else recipe.tracking.new_version_alias,
            num_speculative_tokens=recipe.evaluation.num_speculative_tokens, bundle_base=recipe.tracking.bundle_base,
        )
        tracking.set_tags({"draftsmith.registered_model": result["name"],
                           "draftsmith.registered_version": result["version"]})
        gate = None
        if recipe.evaluation.gate:
            draft = from_export(export_dir, base_dir)
            draft.heldout = heldout_prompts(ctx)
            decision = promotion_gate(name=result["name"], version=result["version"],
                                      draft=draft, settings=recipe.evaluation,
                                      out_dir=out_dir / "gate", device=eval_device(recipe),
                                      vllm=recipe.vllm)
            result["alias"] = decision["alias"]
            gate = GateOutcome(promoted=decision["promoted"], reason=decision["reason"],
                               champion_version=decision["champion_version"])
        return RegistrationArtifact(**result, gate=gate)
