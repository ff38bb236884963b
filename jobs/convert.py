"""Convert: attach the recipe's draft module (EAGLE-3, EAGLE-1 or Medusa) to the frozen base with ModelOpt.

    draftsmith convert --recipe tiny-eagle3 [--set draft.algorithm=medusa]
    python -m jobs.convert --recipe tiny-eagle3 [--set draft.algorithm=medusa]

Runs the stages it depends on first (skipped when done); the checkpoint lands in OUTPUT_DIR/RECIPE/convert-*/draft.
"""

from __future__ import annotations

from draftsmith.cli import run_main, stage_job


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return stage_job(__doc__, "convert", argv, prog)


if __name__ == "__main__":
    run_main(main)
