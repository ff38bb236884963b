"""Run a recipe's stages (all, or up to one) against Ray and MLflow: what every job entry point calls."""

from __future__ import annotations

import ray

from draftsmith import cluster, tracking
from draftsmith.pipeline.runner import run_pipeline
from draftsmith.pipeline.stage import StageResult
from draftsmith.recipe.schema import Recipe
from draftsmith.stages import pipeline_stages


def run_recipe(recipe: Recipe, until: str | None = None) -> dict[str, StageResult]:
    """Check inputs, connect to MLflow and Ray, run the stages; earlier finished stages are skipped."""
    stages = pipeline_stages(until)
    for stage in stages:  # bad inputs (e.g. a base folder that is no causal LM) fail before anything starts
        stage.settings(recipe)
    tracking.configure(recipe.tracking, recipe.output_dir)
    for stage in stages:  # e.g. a registry name taken by another algorithm, before hours of training
        stage.preflight(recipe)
    cluster.check_reachable(recipe.ray)  # an unreachable address fails now, not after the first stages

    def connect_if_needed(stage) -> None:  # Ray starts with the first stage that needs it, if any does
        if stage.needs_ray(recipe):
            cluster.connect(recipe.ray)

    # A Ray this process had joined before (a notebook's, a test session's) is left running; one started or joined
    # here is left when the stages end.
    joined_before = ray.is_initialized()
    try:
        return run_pipeline(recipe, stages, before_run=connect_if_needed)
    finally:
        if not joined_before:
            ray.shutdown()


def summary(results: dict[str, StageResult]) -> dict:
    """The results as JSON-ready dicts (what the jobs print)."""
    return {name: {"skipped": r.skipped, "directory": str(r.directory), "artifact": type(r.outputs).__name__,
                   "outputs": r.outputs.model_dump(mode="json")}
            for name, r in results.items()}
