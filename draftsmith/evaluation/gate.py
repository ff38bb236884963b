"""The promotion gate: a new registered version becomes `champion` only if it beats the current champion.

Both versions run in this job on the same prompts (the recipe's gate set, greedy): the new version's draft and
the base without a draft (its greedy output must be identical with the draft), and the champion's draft on its
own base. The new version is promoted when its mean acceptance length is at least the champion's plus
`evaluation.gate_margin`; otherwise it becomes `challenger`. The decision, the reason and both numbers are
tagged on the version, logged, and written to gate.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.evaluation.evaluate import DraftUnderTest, from_registry, load_sets
from draftsmith.evaluation.measure import BASE, DRAFT, plan_runs, run_engines, summarize
from draftsmith.recipe.schema import EvaluationSettings, VllmSettings
from draftsmith.registry.register import set_alias, tag_version

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
CHAMPION = "champion"


def _gate_numbers(row: dict[str, Any]) -> dict[str, Any]:
    return {"acceptance_length": row[DRAFT]["acceptance_length"] or 1.0,  # None: no step drafted
            "acceptance_rate_per_position": row[DRAFT]["acceptance_rate_per_position"],
            "output_tokens_per_s": row[DRAFT]["output_tokens_per_s"],
            "greedy_identical": row[DRAFT].get("greedy_identical"),
            "greedy_mismatched": row[DRAFT].get("greedy_mismatched")}


def _measure(new: DraftUnderTest, champion: DraftUnderTest | None, runs: list[dict[str, Any]],
             settings: EvaluationSettings, device: str, vllm: VllmSettings | None
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Gate numbers of the new version (its draft and its base alone) and the champion's draft, all in one
    vLLM process."""
    k = settings.num_speculative_tokens
    engines = {BASE: (new.base_dir, None), DRAFT: (new.base_dir, new.speculative_config(k, device))}
    if champion is not None:
        engines[CHAMPION] = (champion.base_dir, champion.speculative_config(k, device))
    results = run_engines(engines, runs, device, vllm)
    new_row = summarize({BASE: results[BASE], DRAFT: results[DRAFT]}, runs, k)[0]
    champion_row = summarize({DRAFT: results[CHAMPION]}, runs, k)[0] if champion is not None else None
    return _gate_numbers(new_row), (_gate_numbers(champion_row) if champion_row is not None else None)


def decide(new: dict[str, Any], champion: dict[str, Any] | None, champion_version: str | None, margin: float
           ) -> tuple[bool, str]:
    """(promote?, reason) from the gate numbers."""
    if not new["greedy_identical"]:
        return False, (f"greedy output with the draft differs from the base's on conversations "
                       f"{new['greedy_mismatched']}: the draft is not lossless in this engine")
    if champion is None:
        return True, "no champion yet"
    need = champion["acceptance_length"] + margin
    verdict = ">=" if new["acceptance_length"] >= need else "<"
    reason = (f"acceptance length {new['acceptance_length']:.3f} {verdict} champion v{champion_version}'s "
              f"{champion['acceptance_length']:.3f} + margin {margin:g}")
    return new["acceptance_length"] >= need, reason


def promotion_gate(*, name: str, version: str, draft: DraftUnderTest, settings: EvaluationSettings,
                   out_dir: Path, device: str = "cpu", vllm: VllmSettings | None = None) -> dict[str, Any]:
    """Evaluate `version` (and the champion, if any) on the gate set; move the aliases; return the decision."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = load_sets(settings, draft.heldout_file(), out_dir, only=settings.gate_set,
                     limit=settings.gate_limit)
    runs = plan_runs(sets, [0.0], settings)
    incumbent = tracking.version_by_alias(name, "champion")
    champion_version = None if incumbent is None or str(incumbent.version) == version else str(incumbent.version)
    incumbent_draft = None if champion_version is None else from_registry(f"models:/{name}/{champion_version}",
                                                                         out_dir / "champion")
    new, champion = _measure(draft, incumbent_draft, runs, settings, device, vllm)
    if incumbent is not None and champion_version is None:
        promote, reason = True, "already the champion"  # a re-run of the register stage
    else:
        promote, reason = decide(new, champion, champion_version, settings.gate_margin)
    alias = "champion" if promote else "challenger"
    set_alias(name, alias, version)
    decision = {"name": name, "version": version, "alias": alias, "promoted": promote, "reason": reason,
                "gate_set": settings.gate_set, "conversations": len(sets[0].conversations), "margin": settings.gate_margin,
                "new": new, "champion_version": champion_version, "champion": champion}
    tag_version(name, version, {"draftsmith.gate": "promoted" if promote else "refused",
                                "draftsmith.gate_reason": reason[:4000],
                                "draftsmith.gate_acceptance_length": f"{new['acceptance_length']:.4f}"})
    (out_dir / GATE_FILE).write_text(json.dumps(decision, indent=2))
    tracking.log_metrics({"gate/acceptance_length": new["acceptance_length"],
                          **({"gate/champion_acceptance_length": champion["acceptance_length"]} if champion else {}),
                          "gate/promoted": float(promote)})
    tracking.log_artifact(out_dir / GATE_FILE, "gate")
    tracking.set_tags({"draftsmith.gate": alias, "draftsmith.gate_reason": reason[:4000]})
    log.info("promotion gate: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision
