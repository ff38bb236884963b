"""Run the pipeline's stages for a recipe under one MLflow parent run; finished stages are skipped.

    python -m jobs.pipeline --recipe tiny-eagle3 [--until STAGE]
    ray job submit --working-dir . --runtime-env platform/runtime_env.yaml -- \
        python -m jobs.pipeline --recipe tiny-eagle3 --set output_dir=/abs/path/runs
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main
from draftsmith.stages.run import run_recipe, summary


def main() -> int:
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--until", help="stop after this stage (e.g. prompts, synthesize)")
    args = parser.parse_args()
    results = run_recipe(parse_recipe(args), until=args.until)
    print(json.dumps(summary(results), indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
