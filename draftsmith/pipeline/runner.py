"""Run stages in order under one MLflow parent run, skipping the ones whose outputs already exist."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from draftsmith import tracking
from draftsmith.pipeline.stage import DONE_MARKER, OutdatedMarker, Stage, StageContext, StageResult
from draftsmith.recipe.loader import as_jsonable, settings_hash
from draftsmith.recipe.schema import Recipe

log = logging.getLogger(__name__)


def stage_dir(recipe: Recipe, stage: Stage, fingerprint: str) -> Path:
    """The artifact layout: OUTPUT_DIR/RECIPE_NAME/STAGE-FINGERPRINT/."""
    return recipe.run_dir() / f"{stage.name}-{fingerprint}"


def run_stage(stage: Stage, recipe: Recipe, upstream: dict[str, StageResult],
              before_run: Callable[[Stage], None] | None = None) -> StageResult:
    fingerprint = stage.fingerprint(recipe, upstream)
    out_dir = stage_dir(recipe, stage, fingerprint)
    try:
        done = stage.read_done(out_dir)
    except OutdatedMarker as e:  # never misread: its outputs may name other fields or mean other things
        log.warning("stage %s: the finished run in %s was written by another version of draftsmith (%s); "
                    "running it again", stage.name, out_dir, e)
        (out_dir / DONE_MARKER).unlink()  # the folder is unfinished until this run's marker replaces it
        done = None
    if done is not None:
        log.info("stage %s: done already (%s), skipping", stage.name, out_dir)
        tracking.finish_unfinished_run(out_dir)  # the work finished, but the server went away before its run did
        return StageResult(stage.name, fingerprint, out_dir, done.artifact, skipped=True,
                           mlflow_run_id=done.mlflow_run_id)
    if before_run is not None:
        before_run(stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: running into %s", stage.name, out_dir)
    tags = {"draftsmith.stage": stage.name, "draftsmith.fingerprint": fingerprint}
    tags.update({f"draftsmith.input.{d}": upstream[d].fingerprint for d in (*stage.depends_on, *stage.optional_inputs)
                 if d in upstream})
    with tracking.start_run(stage.name, nested=True, tags=tags, folder=out_dir) as run:
        tracking.log_params(as_jsonable(stage.settings(recipe)))
        ctx = StageContext(recipe=recipe, upstream=upstream, mlflow_run_id=run.info.run_id)
        artifact = stage.run(ctx, out_dir)
        stage.write_done(out_dir, fingerprint, artifact, run.info.run_id)
    return StageResult(stage.name, fingerprint, out_dir, artifact, mlflow_run_id=run.info.run_id)


def run_pipeline(recipe: Recipe, stages: list[Stage], before_run: Callable[[Stage], None] | None = None
                 ) -> dict[str, StageResult]:
    """Run `stages` in order (each after its dependencies) under one parent MLflow run; `before_run(stage)` is
    called before each stage that is not skipped."""
    results: dict[str, StageResult] = {}
    recipe_hash = settings_hash(recipe)
    current = "pipeline"
    try:
        with tracking.start_run(f"pipeline:{recipe.name}", tags={"draftsmith.recipe": recipe.name,
                                                                 "draftsmith.recipe_hash": recipe_hash},
                                folder=recipe.run_dir(), key=recipe_hash):
            tracking.log_dict(recipe.model_dump(mode="json"), "recipe.json")
            for stage in stages:
                if not stage.enabled(recipe):
                    log.info("stage %s: not used by this recipe", stage.name)
                    continue
                current = f"stage {stage.name}"
                result = run_stage(stage, recipe, results, before_run)
                results[stage.name] = result
                tracking.set_tags({f"draftsmith.stage.{stage.name}": "skipped" if result.skipped else "ran",
                                   f"draftsmith.stage.{stage.name}.dir": str(result.directory)})
    except Exception as exc:
        # MLflow's client retries each call (MLFLOW_HTTP_REQUEST_MAX_RETRIES: about 4 minutes by default), so a
        # server back within that window costs nothing; one that stays away fails the job, said in one line.
        server = None if isinstance(exc, tracking.TrackingError) else tracking.unreachable_server()
        if server is not None:
            raise tracking.TrackingError(
                f"{current}: the MLflow tracking server {server} stopped answering; start it again and re-run the "
                "same command (finished stages are skipped; the unfinished ones continue their MLflow runs)") from exc
        raise
    return results
