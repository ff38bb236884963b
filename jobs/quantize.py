"""Quantize: ModelOpt fake quantization of the trained draft (and base), then the QAT finetune.

    draftsmith quantize --recipe tiny-eagle3 [--set quantization.format=int8]
    python -m jobs.quantize --recipe tiny-eagle3 [--set quantization.format=int8] [--set quantization.qat.steps=0]

Runs the stages it depends on first (skipped when done). `quantization.qat.steps=0` stops after PTQ; the
calibrated checkpoint lands in OUTPUT_DIR/RECIPE/quantize-*/draft, the QAT one in OUTPUT_DIR/RECIPE/qat-*/draft.
"""

from __future__ import annotations

from draftsmith.cli import run_main, stage_job


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return stage_job(__doc__, "qat", argv, prog)


if __name__ == "__main__":
    run_main(main)
