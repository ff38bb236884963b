"""Run the pipeline's stages for a recipe under one MLflow parent run; finished stages are skipped.

    python -m jobs.pipeline --recipe tiny-eagle3
    ray job submit --working-dir . --runtime-env platform/runtime_env.yaml -- \
        python -m jobs.pipeline --recipe tiny-eagle3 --set output_dir=/abs/path/runs
"""

from __future__ import annotations

import json

import ray

from draftsmith import cluster, tracking
from draftsmith.cli import parse_recipe, recipe_parser, run_main
from draftsmith.pipeline.runner import run_pipeline
from draftsmith.stages import pipeline_stages


def main() -> int:
    args = recipe_parser(__doc__.splitlines()[0]).parse_args()
    recipe = parse_recipe(args)
    stages = pipeline_stages()
    for stage in stages:  # bad inputs (e.g. a base folder that is no causal LM) fail before anything starts
        stage.settings(recipe)
    tracking.configure(recipe.tracking, recipe.output_dir)
    cluster.connect(recipe.ray)
    try:
        results = run_pipeline(recipe, stages)
    finally:
        ray.shutdown()
    summary = {name: {"skipped": r.skipped, "directory": str(r.directory), "outputs": r.outputs}
               for name, r in results.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
