"""Quantize: ModelOpt fake quantization of the trained draft (and base), then the QAT finetune.

    python -m jobs.quantize --recipe tiny-eagle3 [--set quantization.format=int8] [--set quantization.qat.steps=0]

Runs the stages it depends on first (skipped when done). `quantization.qat.steps=0` stops after PTQ; the
calibrated checkpoint lands in OUTPUT_DIR/RECIPE/quantize-*/draft, the QAT one in OUTPUT_DIR/RECIPE/qat-*/draft.
"""

from draftsmith.cli import run_stage_job

if __name__ == "__main__":
    run_stage_job(__doc__, "qat")
