"""Register: the export as a new version of the recipe's MLflow registered model, with lineage tags, then the
promotion gate (champion only if it beats the current champion on the gate set).

    draftsmith register --recipe tiny-eagle3
    python -m jobs.register --recipe tiny-eagle3
    python -m jobs.register --recipe tiny-eagle3 --gate VERSION              # re-run the gate for a version
    python -m jobs.register --recipe tiny-eagle3 --promote VERSION --alias champion

Runs the stages it depends on first (skipped when done). With `evaluation.gate` (the default) the gate decides
`champion` or `challenger`; --alias skips the gate and gives the new version that alias; --promote only moves an
alias to an existing version, no questions asked. Load a version anywhere with
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")`.
"""

from __future__ import annotations

import json
import time

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.add_argument("--alias", help="champion or challenger: alias for the new (or --promote'd) version; skips "
                        "the gate")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--promote", metavar="VERSION", help="only move --alias to this existing version")
    action.add_argument("--gate", metavar="VERSION", help="only run the promotion gate for this existing version")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith import tracking
    from draftsmith.registry.register import ALIASES, set_alias
    from draftsmith.stages.run import run_recipe, summary

    # Checked after parsing: --help must not import the registry (MLflow) for the list of aliases.
    if args.alias is not None and args.alias not in ALIASES:
        parser.error(f"argument --alias: invalid choice: {args.alias!r} (choose from {', '.join(ALIASES)})")
    name = recipe.tracking.registry_name
    if args.promote:
        if not args.alias:
            parser.error("--promote needs --alias")
        tracking.configure(recipe.tracking, recipe.output_dir)
        set_alias(name, args.alias, args.promote)
        print(json.dumps({"name": name, "version": args.promote, "alias": args.alias}))
        return 0
    if args.gate:
        from draftsmith.evaluation.evaluate import from_registry
        from draftsmith.evaluation.gate import promotion_gate
        from draftsmith.stages.evaluate import eval_device

        tracking.configure(recipe.tracking, recipe.output_dir)
        out = recipe.run_dir() / "gates" / f"{name}-v{args.gate}-{time.strftime('%Y%m%d-%H%M%S')}"
        with tracking.start_run("gate", tags={"draftsmith.registered_model": name,
                                              "draftsmith.registered_version": args.gate}):
            draft = from_registry(f"models:/{name}/{args.gate}", out / "version")
            decision = promotion_gate(name=name, version=args.gate, draft=draft, settings=recipe.evaluation,
                                      out_dir=out, device=eval_device(recipe), vllm=recipe.vllm)
        print(json.dumps(decision, indent=2))
        return 0
    if args.alias:
        recipe.tracking.new_version_alias = args.alias
        recipe.evaluation.gate = False
    print(json.dumps(summary(run_recipe(recipe, until="register"))["register"], indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
