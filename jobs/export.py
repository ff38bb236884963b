"""Export: the draft in the runtimes' format, the quantized base and the engine configs, round-tripped in vLLM.

    draftsmith export --recipe tiny-eagle3 [--output DIR]
    python -m jobs.export --recipe tiny-eagle3 [--output DIR]

Runs the stages it depends on first (skipped when done); the export lands in OUTPUT_DIR/RECIPE/export-*/export
and, with --output, is copied to DIR (refused when DIR holds the export of another draft).
"""

from __future__ import annotations

import json
from pathlib import Path

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.add_argument("--output", type=Path, help="also copy the export folder here")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith.export.bundle import copy_export
    from draftsmith.pipeline.artifacts import ExportArtifact
    from draftsmith.pipeline.stage import output_of
    from draftsmith.stages.run import run_recipe, summary

    results = run_recipe(recipe, until="export")
    report = summary(results)["export"]
    if args.output is not None:
        report["copied_to"] = str(copy_export(output_of(results, "export", ExportArtifact).export_dir, args.output))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
