"""The promotion gate: a new registered version becomes `champion` only if it beats the free baselines and the
current champion.

Everything runs in this job on the same prompts (the recipe's gate set, greedy), one vLLM process: the new
version's draft, the base without a draft (its greedy output must be identical with the draft where the engine
computes in float32; see `decide`), each of
`evaluation.gate_baselines` (speculation that needs no training, e.g. n-gram prompt lookup) on the same base, and
the champion's draft on its own base. The new version is refused when its speedup over the base is below the best
baseline's (the decision then names that baseline's speculative config: serve it instead); otherwise it is
promoted when its mean acceptance length is at least the champion's plus `evaluation.gate_margin`, and becomes
`challenger` when not. The decision, the reason and the numbers are tagged on the version, logged, and written to
gate.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.evaluation.evaluate import DraftUnderTest, from_registry, load_sets
from draftsmith.evaluation.measure import BASE, DRAFT, NGRAM, ngram_config, plan_runs, run_engines, summarize
from draftsmith.recipe.schema import EvaluationSettings, VllmSettings
from draftsmith.registry.register import set_alias, tag_version

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
CHAMPION = "champion"


def _gate_numbers(row: dict[str, Any], config: str = DRAFT) -> dict[str, Any]:
    return {"acceptance_length": row[config]["acceptance_length"] or 1.0,  # None: no step drafted
            "acceptance_rate_per_position": row[config]["acceptance_rate_per_position"],
            "output_tokens_per_s": row[config]["output_tokens_per_s"],
            "speedup_vs_base": row[config].get("speedup_vs_base"),
            "greedy_identical": row[config].get("greedy_identical"),
            "greedy_mismatched": row[config].get("greedy_mismatched")}


def baseline_configs(settings: EvaluationSettings) -> dict[str, dict[str, Any]]:
    """The speculative configs of the free baselines the gate measures."""
    known = {NGRAM: ngram_config(settings)}
    return {name: known[name] for name in settings.gate_baselines}


def _measure(new: DraftUnderTest, champion: DraftUnderTest | None, runs: list[dict[str, Any]],
             settings: EvaluationSettings, device: str, vllm: VllmSettings | None
             ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Gate numbers of the new version (its draft, its base alone), the champion's draft and the free baselines,
    all in one vLLM process."""
    k = settings.num_speculative_tokens
    baselines = baseline_configs(settings)
    engines = {BASE: (new.base_dir, None), DRAFT: (new.base_dir, new.speculative_config(k, device)),
               **{name: (new.base_dir, config) for name, config in baselines.items()}}
    if champion is not None:
        engines[CHAMPION] = (champion.base_dir, champion.speculative_config(k, device))
    results = run_engines(engines, runs, device, vllm)
    new_row = summarize({name: results[name] for name in (BASE, DRAFT, *baselines)}, runs, k)[0]
    champion_row = summarize({DRAFT: results[CHAMPION]}, runs, k)[0] if champion is not None else None
    measured = {name: {**_gate_numbers(new_row, name), "speculative_config": baselines[name]} for name in baselines}
    return _gate_numbers(new_row), (_gate_numbers(champion_row) if champion_row is not None else None), measured


def faster_baseline(new: dict[str, Any], baselines: dict[str, dict[str, Any]] | None
                    ) -> tuple[str, dict[str, Any]] | None:
    """(name, numbers) of the best free baseline when it is faster than the new version's draft, else None."""
    scored = [(name, b) for name, b in (baselines or {}).items() if b.get("speedup_vs_base") is not None]
    best = max(scored, key=lambda item: item[1]["speedup_vs_base"]) if scored else None
    return best if best is not None and (new.get("speedup_vs_base") or 0.0) < best[1]["speedup_vs_base"] else None


def engine_dtype(device: str, vllm: VllmSettings | None) -> str:
    """The dtype the gate's engine computes in: `auto` is bfloat16 on a CPU with native bfloat16 and the model's
    own dtype (bfloat16 for the bases draftsmith converts) on a GPU."""
    dtype = (vllm or VllmSettings()).dtype
    if device == "cpu":
        from draftsmith.engines.vllm_cpu import cpu_dtype

        return cpu_dtype(dtype)
    return "bfloat16" if dtype == "auto" else dtype


def decide(new: dict[str, Any], champion: dict[str, Any] | None, champion_version: str | None, margin: float,
           baselines: dict[str, dict[str, Any]] | None = None, exact_numerics: bool = True) -> tuple[bool, str]:
    """(promote?, reason) from the gate numbers.

    `exact_numerics`: the engine computes in float32, so greedy output with the draft must equal the base's. In
    bfloat16 or float16, verifying k + 1 positions in one step rounds differently from decoding one token, and a
    near-tie flips a greedy token whatever the draft (vLLM: lossless "up to the precision limits of hardware
    numerics"); the gate then reports the mismatch and does not refuse for it. The export's greedy round trip, which
    a registered version has passed, is the lossless check (in float32 on CPU)."""
    mismatch = ""
    if not new["greedy_identical"]:
        mismatch = (f"greedy output with the draft differs from the base's on conversations "
                    f"{new['greedy_mismatched']}")
        if exact_numerics:
            return False, f"{mismatch}: the draft is not lossless in this engine (float32)"
        mismatch = (f"; {mismatch} (reduced-precision numerics: not refused; the export's round trip is the "
                    "lossless check)")
    faster = faster_baseline(new, baselines)
    if faster is not None:
        name, numbers = faster
        return False, (f"speedup {new.get('speedup_vs_base') or 0.0:.3f}x over the base < {name}'s "
                       f"{numbers['speedup_vs_base']:.3f}x (acceptance length {new['acceptance_length']:.3f} against "
                       f"{numbers['acceptance_length']:.3f}): a free baseline is faster; serve its speculative config "
                       f"{numbers['speculative_config']} instead{mismatch}")
    if champion is None:
        return True, f"no champion yet{mismatch}"
    need = champion["acceptance_length"] + margin
    verdict = ">=" if new["acceptance_length"] >= need else "<"
    reason = (f"acceptance length {new['acceptance_length']:.3f} {verdict} champion v{champion_version}'s "
              f"{champion['acceptance_length']:.3f} + margin {margin:g}{mismatch}")
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
    new, champion, baselines = _measure(draft, incumbent_draft, runs, settings, device, vllm)
    dtype = engine_dtype(device, vllm)
    if incumbent is not None and champion_version is None:
        promote, reason = True, "already the champion"  # a re-run of the register stage
    else:
        promote, reason = decide(new, champion, champion_version, settings.gate_margin, baselines,
                                 exact_numerics=dtype == "float32")
    faster = faster_baseline(new, baselines)
    alias = "champion" if promote else "challenger"
    set_alias(name, alias, version)
    decision = {"name": name, "version": version, "alias": alias, "promoted": promote, "reason": reason,
                "gate_set": settings.gate_set, "conversations": len(sets[0].conversations), "margin": settings.gate_margin,
                "engine_dtype": dtype,
                "new": new, "champion_version": champion_version, "champion": champion, "baselines": baselines,
                "recommended_speculative_config": faster[1]["speculative_config"] if faster else None}
    tag_version(name, version, {"draftsmith.gate": "promoted" if promote else "refused",
                                "draftsmith.gate_reason": reason[:4000],
                                "draftsmith.gate_acceptance_length": f"{new['acceptance_length']:.4f}"})
    (out_dir / GATE_FILE).write_text(json.dumps(decision, indent=2))
    tracking.log_metrics({"gate/acceptance_length": new["acceptance_length"],
                          **({"gate/champion_acceptance_length": champion["acceptance_length"]} if champion else {}),
                          **({"gate/speedup_vs_base": new["speedup_vs_base"]} if new.get("speedup_vs_base") else {}),
                          **{f"gate/{name}_speedup_vs_base": b["speedup_vs_base"] for name, b in baselines.items()
                             if b.get("speedup_vs_base") is not None},
                          "gate/promoted": float(promote)})
    tracking.log_artifact(out_dir / GATE_FILE, "gate")
    tracking.set_tags({"draftsmith.gate": alias, "draftsmith.gate_reason": reason[:4000]})
    log.info("promotion gate: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision
