"""Stage `prompts`: the conversations synthesis answers and the held-out prompts evaluation uses.

Files in `data.sources` are recorded (synthesis reads, validates and quarantines them); `self_generated` sources
are sampled from the base here, each written once (a re-run after a crash reuses the sources already written);
with no sources at all, the embedded base's generator writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.embedded.build import HELDOUT_FILE as EMBEDDED_HELDOUT_FILE
from draftsmith.embedded.build import heldout_conversations
from draftsmith.embedded.conversations import Conversation, conversation_key, generate_conversations
from draftsmith.jsonl import read_jsonl, write_jsonl
from draftsmith.pipeline.artifacts import BaseArtifact, PromptsArtifact, PromptSource
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import FileSource, Recipe, SelfGeneratedSource

PROMPTS_FILE = "prompts.jsonl"
HELDOUT_FILE = "heldout.jsonl"

# Offset from the base corpus seed, so synthesis prompts are new draws rather than the base's training set.
_PROMPT_SEED_OFFSET = 7


def prompts_device(recipe: Recipe) -> str:
    return "gpu" if recipe.synthesis.use_gpu else "cpu"


class PromptsStage(Stage):
    name = "prompts"
    artifact = PromptsArtifact
    version = 4  # self-generated sources; the held-out file is always named
    depends_on = ("base",)

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # files, and vLLM in a child process for self-generated prompts

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        generates = any(isinstance(s, SelfGeneratedSource) for s in recipe.data.sources)
        return {
            "sources": [s.model_dump(mode="json") for s in recipe.data.sources],
            "num_prompts": recipe.data.num_prompts if not recipe.data.sources else None,
            **({"vllm": recipe.vllm.model_dump(mode="json"), "device": prompts_device(recipe)} if generates else {}),
        }

    def preflight(self, recipe: Recipe) -> None:
        from draftsmith.synthesis.records import check_source

        for n, source in enumerate(recipe.data.sources):
            if isinstance(source, FileSource):
                check_source(source.path, f"data.sources[{n}].path")
        for prompt_set in recipe.evaluation.prompt_sets:
            if prompt_set.path is not None:
                check_source(prompt_set.path, f"evaluation.prompt_sets[{prompt_set.name}].path")

    def run(self, ctx: StageContext, out_dir: Path) -> PromptsArtifact:
        recipe = ctx.recipe
        base_dir = ctx.input("base", BaseArtifact).model_dir
        if not recipe.data.sources:
            return self._embedded(recipe, base_dir, out_dir)
        sources, heldout, metrics = [], [], {}
        for n, source in enumerate(recipe.data.sources):
            if isinstance(source, FileSource):
                sources.append(PromptSource(path=Path(source.path).expanduser().resolve(), format=source.format))
                continue
            path, held, stats = self._self_generated(recipe, base_dir, source, n, out_dir)
            sources.append(PromptSource(path=path.resolve(), format="openai"))
            heldout += held
            metrics.update({f"self_generated{n}/{k}": float(v) for k, v in stats.items()
                            if isinstance(v, int | float)})
        heldout_file: Path | None = None
        if heldout:
            heldout_file = write_jsonl(out_dir / HELDOUT_FILE, heldout).resolve()
        elif (base_dir / EMBEDDED_HELDOUT_FILE).is_file():
            heldout_file = (base_dir / EMBEDDED_HELDOUT_FILE).resolve()
        if metrics:
            tracking.log_metrics(metrics)
        return PromptsArtifact(sources=sources, heldout=heldout_file, generated=bool(metrics))

    def _self_generated(self, recipe: Recipe, base_dir: Path, source: SelfGeneratedSource, n: int,
                        out_dir: Path) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
        """One self-generated source's prompts file, its held-out records and its figures (written last, so a
        source with a stats file is whole and a re-run reuses it)."""
        from draftsmith.synthesis.self_generated import generate_self_prompts

        prompts_file, heldout_file = out_dir / f"self-generated-{n}.jsonl", out_dir / f"self-generated-{n}.heldout.jsonl"
        stats_file = out_dir / f"self-generated-{n}.stats.json"
        if not stats_file.is_file():
            result = generate_self_prompts(base_dir, source, f"source{n}", device=prompts_device(recipe),
                                           vllm=recipe.vllm)
            write_jsonl(prompts_file, result.prompts)
            write_jsonl(heldout_file, result.heldout)
            write_jsonl(out_dir / f"self-generated-{n}.rejected.jsonl", result.rejected)
            stats_file.write_text(json.dumps(result.stats, indent=2))
            tracking.log_artifact(stats_file, "prompts")
        return prompts_file, read_jsonl(heldout_file), json.loads(stats_file.read_text())

    def _embedded(self, recipe: Recipe, base_dir: Path, out_dir: Path) -> PromptsArtifact:
        heldout = heldout_conversations(base_dir)
        corpus = recipe.base.embedded.corpus
        conversations = generate_conversations(
            recipe.data.num_prompts, corpus.seed + _PROMPT_SEED_OFFSET, tuple(corpus.families),
            corpus.recall_share, exclude_keys=frozenset(conversation_key(Conversation.from_record(r)) for r in heldout),
        )
        write_jsonl(out_dir / PROMPTS_FILE, (c.to_record() for c in conversations))
        write_jsonl(out_dir / HELDOUT_FILE, heldout)
        tracking.log_metrics({"prompts": len(conversations), "heldout": len(heldout)})
        return PromptsArtifact(sources=[PromptSource(path=(out_dir / PROMPTS_FILE).resolve(), format="openai")],
                               heldout=(out_dir / HELDOUT_FILE).resolve(), generated=True)
