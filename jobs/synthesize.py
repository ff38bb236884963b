"""Synthesize: the base model regenerates every assistant turn of the recipe's prompt datasets.

    python -m jobs.synthesize --recipe tiny-eagle3 [--set synthesis.engine=openai --set synthesis.openai.base_url=...]

Runs the stages it depends on first (skipped when done); output lands in OUTPUT_DIR/RECIPE/synthesize-*/.
"""

from draftsmith.cli import run_stage_job

if __name__ == "__main__":
    run_stage_job(__doc__, "synthesize")
