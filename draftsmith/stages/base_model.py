"""Stage `base`: the frozen base model, built (embedded default), converted (a GGUF file) or checked (a user's
Hugging Face folder)."""

from __future__ import annotations

from pathlib import Path

from draftsmith import tracking
from draftsmith.base_model import model_fingerprint, resolve_base_folder
from draftsmith.embedded.build import build_embedded_base, build_report, is_built
from draftsmith.pipeline.artifacts import BaseArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import BaseModelSettings, Recipe


class BaseModelStage(Stage):
    name = "base"
    artifact = BaseArtifact

    def needs_ray(self, recipe: Recipe) -> bool:
        # Only building the embedded base trains on Ray; a cached one or a user's folder is read as it is.
        return recipe.base.model == "embedded" and not is_built(recipe.base.embedded)

    def settings(self, recipe: Recipe) -> BaseModelSettings | dict[str, str]:
        if recipe.base.model == "embedded":
            return recipe.base
        # A user's folder: its identity is its content, not the unused embedded settings.
        folder = resolve_base_folder(recipe.base.model)
        return {"model": str(folder), "model_hash": model_fingerprint(folder)}

    def run(self, ctx: StageContext, out_dir: Path) -> BaseArtifact:
        settings = ctx.recipe.base
        if settings.model == "embedded":
            model_dir = build_embedded_base(settings.embedded, tracking_uri=tracking.current_uri())
            report = build_report(model_dir)
            tracking.log_metrics({"exact_match": report["exact_match"], "eos_share": report["eos_share"]})
        else:
            model_dir = resolve_base_folder(settings.model)
        fingerprint = model_fingerprint(model_dir)
        tracking.set_tags({"draftsmith.base_model": str(model_dir), "draftsmith.base_model_hash": fingerprint})
        return BaseArtifact(model_dir=model_dir, model_hash=fingerprint, embedded=settings.model == "embedded")
