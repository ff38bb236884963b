"""Convert: attach the recipe's draft module (EAGLE-3, EAGLE-1 or Medusa) to the frozen base with ModelOpt.

    python -m jobs.convert --recipe tiny-eagle3 [--set draft.algorithm=medusa]

Runs the stages it depends on first (skipped when done); the checkpoint lands in OUTPUT_DIR/RECIPE/convert-*/draft.
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main
from draftsmith.stages.run import run_recipe, summary


def main() -> int:
    args = recipe_parser(__doc__.splitlines()[0]).parse_args()
    results = run_recipe(parse_recipe(args), until="convert")
    print(json.dumps(summary(results)["convert"], indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
