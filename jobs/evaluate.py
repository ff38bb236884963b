"""Evaluate a draft through vLLM: acceptance length, tokens/s against the base and n-gram speculation, greedy
equality, on the recipe's prompt sets at its temperatures.

    draftsmith evaluate --recipe tiny-eagle3                                  # the recipe's own export
    python -m jobs.evaluate --recipe tiny-eagle3                              # the same
    python -m jobs.evaluate --recipe tiny-eagle3 --model models:/tiny-eagle3-draft@champion
    python -m jobs.evaluate --recipe tiny-eagle3 --export runs/tiny-eagle3/export-*/export [--base DIR]

Without --model/--export it runs the pipeline up to `evaluate` (finished stages are skipped). Otherwise the
recipe supplies the evaluation settings (`evaluation.*`: prompt sets, temperatures, max_tokens, ...) and MLflow.
The report (evaluation.json, evaluation.md, plots/) goes to --out and to an MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model", help="a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    target.add_argument("--export", help="an export folder (with manifest.json)")
    parser.add_argument("--base", help="the base model folder, when it moved since the export")
    parser.add_argument("--out", type=Path, help="report folder (default OUTPUT_DIR/RECIPE/evaluations/TIME)")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith import tracking
    from draftsmith.evaluation.evaluate import evaluate_draft, resolve_draft
    from draftsmith.pipeline.artifacts import EvaluationArtifact, PromptsArtifact
    from draftsmith.pipeline.stage import output_of
    from draftsmith.stages.evaluate import eval_device
    from draftsmith.stages.run import run_recipe

    if not (args.model or args.export):
        print(output_of(run_recipe(recipe, until="evaluate"), "evaluate", EvaluationArtifact).markdown.read_text())
        return 0
    heldout = None
    if recipe.data.heldout_prompts() and any(s.path is None for s in recipe.evaluation.prompt_sets):
        # the self-generated held-out prompts: the pipeline's prompts stage (skipped when done)
        heldout = output_of(run_recipe(recipe, until="prompts"), "prompts", PromptsArtifact).heldout
    tracking.configure(recipe.tracking, recipe.output_dir)
    out = args.out or recipe.run_dir() / "evaluations" / time.strftime("%Y%m%d-%H%M%S")
    with tracking.start_run("evaluate", tags={"draftsmith.recipe": recipe.name,
                                              "draftsmith.evaluated": args.model or str(args.export)}):
        draft = resolve_draft(args.model or args.export, args.base)
        draft.heldout = heldout
        report = evaluate_draft(draft, recipe.evaluation, out, device=eval_device(recipe), vllm=recipe.vllm)
    print((out / "evaluation.md").read_text())
    print(json.dumps({"report": str(out / "evaluation.json")}))
    return 0 if report else 1


if __name__ == "__main__":
    run_main(main)
