"""Register: the export as a new version of the recipe's MLflow registered model, with lineage tags.

    python -m jobs.register --recipe tiny-eagle3 [--alias champion]
    python -m jobs.register --recipe tiny-eagle3 --promote VERSION --alias champion

Runs the stages it depends on first (skipped when done). The new version gets tracking.new_version_alias
(`challenger` by default) unless --alias says otherwise; --promote only moves an alias to an existing version.
Load it anywhere with `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`.
"""

from __future__ import annotations

import json

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main() -> int:
    from draftsmith import tracking
    from draftsmith.registry.register import ALIASES, set_alias
    from draftsmith.stages.run import run_recipe, summary

    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--alias", choices=ALIASES, help="alias for the new (or --promote'd) version")
    parser.add_argument("--promote", metavar="VERSION", help="only move --alias to this existing version")
    args = parser.parse_args()
    recipe = parse_recipe(args)
    if args.promote:
        if not args.alias:
            parser.error("--promote needs --alias")
        tracking.configure(recipe.tracking, recipe.output_dir)
        set_alias(recipe.tracking.registry_name, args.alias, args.promote)
        print(json.dumps({"name": recipe.tracking.registry_name, "version": args.promote, "alias": args.alias}))
        return 0
    if args.alias:
        recipe.tracking.new_version_alias = args.alias
    print(json.dumps(summary(run_recipe(recipe, until="register"))["register"], indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
