"""Convert: attach the recipe's draft module (EAGLE-3, EAGLE-1 or Medusa) to the frozen base with ModelOpt.

    python -m jobs.convert --recipe tiny-eagle3 [--set draft.algorithm=medusa]

Runs the stages it depends on first (skipped when done); the checkpoint lands in OUTPUT_DIR/RECIPE/convert-*/draft.
"""

from draftsmith.cli import run_stage_job

if __name__ == "__main__":
    run_stage_job(__doc__, "convert")
