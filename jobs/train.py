"""Train the draft on Ray Train with DeepSpeed, continuing from the latest checkpoint of an interrupted run.

    draftsmith train --recipe tiny-eagle3 [--resume | --fresh]
    python -m jobs.train --recipe tiny-eagle3 [--resume | --fresh] [--set training.zero_stage=3]

--resume insists on continuing from a checkpoint (and fails if there is none); --fresh discards earlier
checkpoints; by default a checkpoint of the same settings is continued when one exists.
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint; fail if none")
    group.add_argument("--fresh", action="store_true", help="discard earlier checkpoints and start over")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith.stages.run import run_recipe, summary

    if args.resume or args.fresh:
        recipe.training.resume = "require" if args.resume else "never"
    results = run_recipe(recipe, until="train")
    print(json.dumps(summary(results)["train"], indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
