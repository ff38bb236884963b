"""Stage `register`: the export as a new version of the recipe's registered model (pyfunc + lineage tags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from draftsmith import tracking
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.registry.lineage import lineage_tags
from draftsmith.registry.register import check_registry_name, register_export

RECIPE_FILE = "recipe.yaml"


class RegisterStage(Stage):
    name = "register"
    depends_on = ("base", "dataset", "synthesize", "train", "quantize", "qat", "export")

    def settings(self, recipe: Recipe) -> Any:
        return {"registry_name": recipe.tracking.registry_name, "alias": recipe.tracking.new_version_alias,
                "bundle_base": recipe.tracking.bundle_base}

    def preflight(self, recipe: Recipe) -> None:
        check_registry_name(recipe.tracking.registry_name, recipe.draft.algorithm)

    def run(self, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        recipe = ctx.recipe
        recipe_file = out_dir / RECIPE_FILE
        recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        result = register_export(
            name=recipe.tracking.registry_name, export_dir=Path(ctx.upstream["export"].outputs["export_dir"]),
            base_dir=Path(ctx.upstream["base"].outputs["model_dir"]), recipe_file=recipe_file,
            tags=lineage_tags(recipe, ctx.upstream), alias=recipe.tracking.new_version_alias,
            num_speculative_tokens=recipe.evaluation.num_speculative_tokens, bundle_base=recipe.tracking.bundle_base,
        )
        tracking.set_tags({"draftsmith.registered_model": result["name"],
                           "draftsmith.registered_version": result["version"]})
        return result
