"""Synthesize: the base model regenerates every assistant turn of the recipe's prompt datasets.

    python -m jobs.synthesize --recipe tiny-eagle3 [--set synthesis.engine=openai --set synthesis.openai.base_url=...]

Runs the stages it depends on first (skipped when done); output lands in OUTPUT_DIR/RECIPE/synthesize-*/.
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main
from draftsmith.stages.run import run_recipe, summary


def main() -> int:
    args = recipe_parser(__doc__.splitlines()[0]).parse_args()
    results = run_recipe(parse_recipe(args), until="synthesize")
    print(json.dumps(summary(results)["synthesize"], indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
