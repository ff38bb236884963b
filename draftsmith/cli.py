"""What every entry point in jobs/ shares: the --recipe/--set arguments, logging, and user-error exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from draftsmith.base_model import BaseModelError
from draftsmith.cluster import ClusterError
from draftsmith.recipe.loader import RecipeError, load_recipe
from draftsmith.recipe.schema import Recipe
from draftsmith.synthesis.synthesize import SynthesisError
from draftsmith.tracking import TrackingError

# Errors that mean "the user must change something": one clear line each, exit code 2, no traceback.
USER_ERRORS = (RecipeError, BaseModelError, TrackingError, ClusterError, SynthesisError, ValueError, FileNotFoundError)


def recipe_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=True,
                        help="a recipe YAML path, or a name in platform/recipes/ (e.g. tiny-eagle3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override validated like the file, e.g. training.lr=1e-4 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def parse_recipe(args: argparse.Namespace) -> Recipe:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_recipe(args.recipe, args.overrides)


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point; a user error prints its message alone and exits 2."""
    try:
        code = main()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def run_stage_job(doc: str, stage: str) -> None:
    """The whole of a job that runs the pipeline up to `stage` and prints that stage's summary."""
    import json

    from draftsmith.stages.run import run_recipe, summary

    def main() -> int:
        args = recipe_parser(doc.splitlines()[0]).parse_args()
        print(json.dumps(summary(run_recipe(parse_recipe(args), until=stage))[stage], indent=2))
        return 0

    run_main(main)
