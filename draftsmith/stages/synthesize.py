"""Stage `synthesize`: the base model answers the prompt conversations turn by turn (Ray Data + vLLM)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.pipeline.artifacts import BaseArtifact, PromptsArtifact, SynthesisArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.synthesis.synthesize import MANIFEST, QUARANTINE_DIR, SynthesisError, synthesize_conversations

SAMPLE_SIZE = 20


class SynthesizeStage(Stage):
    name = "synthesize"
    artifact = SynthesisArtifact
    depends_on = ("base", "prompts")

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        # Parallelism, retries, timeouts and the bad-share threshold do not change what is written: keep them
        # out of the fingerprint, so raising the threshold after a failed run reuses its work. shard_size stays
        # in: resumable state is laid out by shard.
        synthesis = recipe.synthesis.model_dump(mode="json", exclude={
            "concurrency": True, "batch_size": True,
            "openai": {"max_concurrency", "max_retries", "timeout_s", "api_key_env"}})
        return {"synthesis": synthesis}

    def preflight(self, recipe: Recipe) -> None:
        # An endpoint that is down would otherwise answer every request with a connection error, and each
        # conversation would be quarantined as if the data were bad.
        if recipe.synthesis.engine == "openai":
            from draftsmith.synthesis.engines import check_endpoint

            check_endpoint(recipe.synthesis.openai)

    def run(self, ctx: StageContext, out_dir: Path) -> SynthesisArtifact:
        recipe = ctx.recipe
        sources = [(str(s.path), s.format) for s in ctx.input("prompts", PromptsArtifact).sources]
        model_dir = ctx.input("base", BaseArtifact).model_dir
        tracking.set_tags({"draftsmith.synthesis.engine": recipe.synthesis.engine,
                           "draftsmith.synthesis.output": str(out_dir)})
        try:
            summary = synthesize_conversations(sources, model_dir, recipe.synthesis, out_dir,
                                               recipe.data.max_bad_share, vllm=recipe.vllm)
        except SynthesisError:
            tracking.log_artifact(out_dir / MANIFEST)
            tracking.log_artifact(out_dir / QUARANTINE_DIR, artifact_path="quarantine")
            raise
        tracking.log_metrics({k: summary[k] for k in ("read", "duplicates", "written", "quarantined",
                                                      "bad_share", "generated_tokens", "tokens_per_s")})
        tracking.log_artifact(out_dir / MANIFEST)
        tracking.log_artifact(out_dir / QUARANTINE_DIR, artifact_path="quarantine")
        with open(summary["shards"][0]) as f:
            sample = [json.loads(line) for line in itertools.islice(f, SAMPLE_SIZE)]
        tracking.log_dict(sample, "sample_conversations.json")
        return SynthesisArtifact(conversations=summary["shards"], output_dir=summary["output_dir"],
                                 written=summary["written"], quarantined=summary["quarantined"], read=summary["read"])
