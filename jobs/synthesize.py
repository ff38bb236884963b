"""Synthesize: the base model regenerates every assistant turn of the recipe's prompt datasets.

    draftsmith synthesize --recipe tiny-eagle3
    python -m jobs.synthesize --recipe tiny-eagle3 [--set synthesis.engine=openai --set synthesis.openai.base_url=...]

Runs the stages it depends on first (skipped when done); output lands in OUTPUT_DIR/RECIPE/synthesize-*/.
"""

from __future__ import annotations

from draftsmith.cli import run_main, stage_job


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return stage_job(__doc__, "synthesize", argv, prog)


if __name__ == "__main__":
    run_main(main)
