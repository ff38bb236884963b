"""Stage `convert`: the frozen base with a randomly initialised draft attached by ModelOpt, saved as a draft
checkpoint (ModelOpt state + draft tensors) that training restores exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from draftsmith import tracking
from draftsmith.base_model import resolve_base_folder
from draftsmith.draft.algorithms import get_algorithm, text_config
from draftsmith.draft.checkpoint import DraftMeta, save_draft
from draftsmith.draft.convert import base_state_keys, convert_base
from draftsmith.draft.vocab import draft_vocabulary
from draftsmith.pipeline.artifacts import BaseArtifact, ConvertArtifact, DatasetArtifact
from draftsmith.pipeline.stage import Stage, StageContext
from draftsmith.recipe.schema import Recipe
from draftsmith.training.draft_data import token_counts

DRAFT_DIR = "draft"
VOCAB_FILE = "draft_vocab.json"


def draft_meta(recipe: Recipe, base_dir: Path, base_hash: str) -> dict[str, Any]:
    draft = recipe.draft
    return DraftMeta(algorithm=draft.algorithm, base_model_dir=str(base_dir), base_model_hash=base_hash,
                     **get_algorithm(draft.algorithm).meta(draft))


class ConvertStage(Stage):
    name = "convert"
    artifact = ConvertArtifact
    depends_on = ("base", "dataset")

    def needs_ray(self, recipe: Recipe) -> bool:
        return False  # ModelOpt in this process

    def settings(self, recipe: Recipe) -> Any:
        # A draft that cannot fit the base fails here, before synthesis spends hours on its data.
        algorithm = get_algorithm(recipe.draft.algorithm)
        if recipe.base.model != "embedded":
            algorithm.check_fits(recipe.draft, AutoConfig.from_pretrained(resolve_base_folder(recipe.base.model)))
        else:  # the embedded base's shape is known from the recipe (its vocabulary is at most the BPE target)
            arch = recipe.base.embedded.architecture
            algorithm.check_fits(recipe.draft, SimpleNamespace(
                model_type="llama", hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
                num_attention_heads=arch.hidden_size // arch.head_dim, vocab_size=arch.vocab_size,
                intermediate_size=arch.intermediate_size))
        # The algorithm's own settings only (adding an algorithm's section leaves the others' conversions done); a
        # layout revision, when the algorithm has one, makes finished conversions of the old layout re-run.
        settings = recipe.draft.model_dump(mode="json", include={"algorithm", "seed", algorithm.settings_section})
        if algorithm.layout_revision is not None:
            settings["layout_revision"] = algorithm.layout_revision
        return settings

    def run(self, ctx: StageContext, out_dir: Path) -> ConvertArtifact:
        recipe, base = ctx.recipe, ctx.input("base", BaseArtifact)
        base_dir = base.model_dir
        vocab_size = text_config(AutoConfig.from_pretrained(str(base_dir))).vocab_size
        d2t, vocab_report = None, {"draft_vocab_size": vocab_size, "base_vocab_size": vocab_size}
        size = recipe.draft.eagle.draft_vocab_size
        algorithm = get_algorithm(recipe.draft.algorithm)
        if algorithm.capabilities.draft_vocabulary and size is not None and size < vocab_size:
            counts = token_counts(ctx.input("dataset", DatasetArtifact).data_dir)
            d2t, t2d, vocab_report = draft_vocabulary(counts, size)
            tracking.log_metrics({"target_token_coverage": vocab_report["target_token_coverage"]})
        (out_dir / VOCAB_FILE).write_text(json.dumps(vocab_report, indent=2))
        model = convert_base(base_dir, recipe.draft, d2t=d2t)
        base_keys = base_state_keys(base_dir)
        prefix = algorithm.prefix
        draft_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
        base_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(prefix))
        save_draft(model, out_dir / DRAFT_DIR, base_keys=base_keys,
                   meta=draft_meta(recipe, base_dir, base.model_hash))
        tracking.log_metrics({"draft_parameters": draft_params, "base_parameters": base_params})
        tracking.log_artifact(out_dir / VOCAB_FILE)
        tracking.set_tags({"draftsmith.algorithm": recipe.draft.algorithm})
        return ConvertArtifact(draft_dir=(out_dir / DRAFT_DIR).resolve(), algorithm=recipe.draft.algorithm,
                               draft_parameters=draft_params, base_parameters=base_params, **vocab_report)
