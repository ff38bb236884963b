"""Stage `prompts`: the conversations synthesis answers and the held-out prompt set evaluation uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.embedded.build import heldout_conversations
from draftsmith.embedded.conversations import Conversation, conversation_key, generate_conversations
from draftsmith.jsonl import write_jsonl
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe

PROMPTS_FILE = "prompts.jsonl"
HELDOUT_FILE = "heldout.jsonl"

# Offset from the base corpus seed, so synthesis prompts are new draws rather than the base's training set.
_PROMPT_SEED_OFFSET = 7


class PromptsStage(Stage):
    name = "prompts"
    version = 3  # sources carry their format, as absolute paths
    depends_on = ("base",)

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # files only

    def settings(self, recipe: Recipe) -> dict[str, Any]:
        return {
            "sources": [s.model_dump(mode="json") for s in recipe.data.sources],
            "num_prompts": recipe.data.num_prompts if not recipe.data.sources else None,
        }

    def run(self, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        recipe = ctx.recipe
        if recipe.data.sources:
            # User datasets are read, validated and quarantined by synthesis; this stage only records them.
            return {"sources": [{"path": str(Path(s.path).expanduser().resolve()), "format": s.format}
                                for s in recipe.data.sources], "generated": False}
        base_dir = Path(ctx.upstream["base"].outputs["model_dir"])
        heldout = heldout_conversations(base_dir)
        corpus = recipe.base.embedded.corpus
        conversations = generate_conversations(
            recipe.data.num_prompts, corpus.seed + _PROMPT_SEED_OFFSET, tuple(corpus.families),
            corpus.recall_share, exclude_keys=frozenset(conversation_key(Conversation.from_record(r)) for r in heldout),
        )
        write_jsonl(out_dir / PROMPTS_FILE, (c.to_record() for c in conversations))
        write_jsonl(out_dir / HELDOUT_FILE, heldout)
        tracking.log_metrics({"prompts": len(conversations), "heldout": len(heldout)})
        return {"sources": [{"path": str((out_dir / PROMPTS_FILE).resolve()), "format": "openai"}],
                "heldout": str((out_dir / HELDOUT_FILE).resolve()),
                "generated": True}
