"""What every entry point in jobs/ shares: the --recipe/--set arguments, logging, and user-error exits.

Imports nothing heavy at load time: `--help` of every job and of the `draftsmith` command must not
pay for transformers, Ray or MLflow (about 15 s); what a job needs it imports once its arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from draftsmith import progress

if TYPE_CHECKING:
    from draftsmith.recipe.schema import Recipe

# Errors that mean "the user must change something": one clear line each, exit code 2, no traceback. Named by
# module rather than imported, for the reason above; builtins are always included.
USER_ERROR_TYPES = {
    "draftsmith.recipe.loader": "RecipeError",
    "draftsmith.base_model": "BaseModelError",
    "draftsmith.tracking": "TrackingError",
    "draftsmith.cluster": "ClusterError",
    "draftsmith.synthesis.synthesize": "SynthesisError",
}


def user_errors() -> tuple[type[Exception], ...]:
    """The user-error types of the modules loaded so far: an error whose module was never loaded cannot have been
    raised, so looking only at those avoids importing anything."""
    loaded = [getattr(sys.modules[module], name) for module, name in USER_ERROR_TYPES.items() if module in sys.modules]
    return (*loaded, ValueError, FileNotFoundError)


def recipe_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A job's parser; its help is the job's docstring as written: a sentence, then examples."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True,
                        help="a recipe YAML path, or a name in platform/recipes/ (e.g. tiny-eagle3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override validated like the file, e.g. training.lr=1e-4 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def parse_recipe(args: argparse.Namespace) -> Recipe:
    from draftsmith.recipe.loader import load_recipe

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_recipe(args.recipe, args.overrides)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point; a user error prints its message alone and exits 2."""
    progress.configure()  # before the job imports tqdm or Ray
    try:
        code = main()
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def stage_job(doc: str, stage: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """The whole of a job that runs the pipeline up to `stage` and prints that stage's outputs as JSON."""
    args = recipe_parser(doc, prog).parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith.stages.run import run_recipe, summary

    print(json.dumps(summary(run_recipe(recipe, until=stage))[stage], indent=2))
    return 0
