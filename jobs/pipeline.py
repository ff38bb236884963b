"""Run the pipeline's stages for a recipe under one MLflow parent run; finished stages are skipped.

    draftsmith pipeline --recipe tiny-eagle3 [--until STAGE] [--json]
    python -m jobs.pipeline --recipe tiny-eagle3 [--until STAGE]
    ray job submit --working-dir . --runtime-env platform/runtime_env.yaml -- \\
        python -m jobs.pipeline --recipe tiny-eagle3 --set output_dir=/abs/path/runs

It ends with a summary (what was built, the registered version, acceptance and speedup, where things are, what to
run next); every stage's outputs go to OUTPUT_DIR/RECIPE/pipeline.json, which --json prints instead.
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.add_argument("--until", help="stop after this stage (e.g. prompts, synthesize)")
    parser.add_argument("--json", action="store_true", help="print every stage's outputs as JSON, not the summary")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith import tracking
    from draftsmith.pipeline.summary import SUMMARY_JSON, run_summary
    from draftsmith.stages.run import run_recipe, summary

    results = run_recipe(recipe, until=args.until)
    record = summary(results)
    json_file = recipe.run_dir() / SUMMARY_JSON
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        recipe_args = ["--recipe", args.recipe, *(a for o in args.overrides for a in ("--set", o))]
        print(run_summary(recipe_args, recipe.run_dir(), results, tracking.current_uri(), recipe.tracking.experiment,
                          json_file))
    return 0


if __name__ == "__main__":
    run_main(main)
