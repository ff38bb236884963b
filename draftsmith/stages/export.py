"""Stage `export`: the (QAT-finetuned) draft in the runtimes' format, the quantized base and the engine configs,
checked by a greedy round trip through vLLM before the stage reports success."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.export.bundle import export_bundle
from draftsmith.export.engine_configs import engine_config
from draftsmith.export.manifest import MANIFEST, ExportManifest
from draftsmith.export.verify import RoundTripError, first_user_turns, greedy_round_trip
from draftsmith.pipeline.artifacts import (BaseArtifact, ExportArtifact, QatArtifact, QuantizeArtifact,
                                           RoundTrip, SynthesisArtifact)
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe

EXPORT_DIR = "export"


class ExportStage(Stage):
    name = "export"
    artifact = ExportArtifact
    depends_on = ("base", "synthesize", "quantize", "qat")

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # ModelOpt in this process, vLLM in a child process

    def settings(self, recipe: Recipe) -> Any:
        return recipe.export

    def run(self, ctx: StageContext, out_dir: Path) -> ExportArtifact:
        recipe, base = ctx.recipe, ctx.input("base", BaseArtifact)
        settings = recipe.export
        device = "gpu" if recipe.training.use_gpu else "cpu"

        def round_trip(folder: Path, manifest: ExportManifest) -> RoundTrip | None:
            config = engine_config(folder, manifest, "vllm", device=device, settings=settings)
            if settings.verify_prompts == 0 or "vllm" not in settings.targets or config is None:
                return None
            conversations = [str(p) for p in ctx.input("synthesize", SynthesisArtifact).conversations]
            prompts = first_user_turns(conversations, settings.verify_prompts)
            # On CPU the check runs in float32: in bf16, verifying k + 1 positions in one step rounds differently
            # from decoding one token at a time, so near-tie tokens flip (2 of 4 SmolLM2 prompts did) whatever the
            # export; float32 checks the export itself.
            vllm = recipe.vllm.model_copy(update={"dtype": "float32"}) if device == "cpu" else recipe.vllm
            result = greedy_round_trip(base.model_dir, config, prompts, settings.verify_max_tokens, device, vllm)
            if not result.identical:
                raise RoundTripError(
                    f"vLLM's greedy output with the exported draft differs from the base's on prompts "
                    f"{result.mismatched_prompts} of {result.prompts}: the export is not lossless"
                )
            return result

        manifest = export_bundle(
            checkpoint=ctx.input("qat", QatArtifact).draft_dir, base_dir=base.model_dir, base_hash=base.model_hash,
            quantized_base_dir=ctx.input("quantize", QuantizeArtifact).quantized_base_dir,
            settings=settings, out_dir=out_dir / EXPORT_DIR, verify=round_trip,
        )
        verification = manifest.verification
        if verification is not None and verification.acceptance_length is not None:
            tracking.log_metrics({"roundtrip_acceptance_length": verification.acceptance_length,
                                  "roundtrip_identical": float(verification.identical)})
        tracking.log_artifact(out_dir / EXPORT_DIR / MANIFEST)
        tracking.set_tags({"draftsmith.export": str((out_dir / EXPORT_DIR).resolve())})
        return ExportArtifact(export_dir=(out_dir / EXPORT_DIR).resolve(), algorithm=manifest.algorithm,
                              variants=manifest.draft.variants, engine_configs=manifest.engine_configs,
                              verification=verification)
