"""Benchmarks of the speculative-decoding half: the recipe's pipeline through `evaluate`, then the same recipe with
a bf16 (unquantized) draft and with Medusa, evaluated on the same held-out prompts in the same job.

Sections: stage wall times, bf16 -> PTQ -> QAT validation, the evaluation table (acceptance length, tokens/s
against the base and n-gram), the algorithm/precision comparison, and the issue's targets.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mlflow import MlflowClient

from draftsmith.bench.report import Section
from draftsmith.draft.algorithms import ALGORITHMS
from draftsmith.evaluation.evaluate import from_export, load_sets
from draftsmith.evaluation.measure import BASE, DRAFT, NGRAM, plan_runs, run_configurations, summarize
from draftsmith.pipeline.artifacts import BaseArtifact, EvaluationArtifact, ExportArtifact, QatArtifact
from draftsmith.pipeline.stage import StageResult, output_of
from draftsmith.recipe.loader import load_recipe
from draftsmith.recipe.schema import Recipe
from draftsmith.stages.evaluate import eval_device
from draftsmith.stages.run import run_recipe

log = logging.getLogger(__name__)

TARGET_ACCEPTANCE = 3.0
TARGET_VS_NGRAM = 1.5
TARGET_QAT_LOSS = 0.03  # QAT FP8 acceptance within 3% of bf16
def stage_seconds(run_id: str | None) -> float | None:
    if not run_id:
        return None
    info = MlflowClient().get_run(run_id).info
    return (info.end_time - info.start_time) / 1000 if info.end_time else None


def _gate_set(recipe: Recipe):
    return next(s for s in recipe.evaluation.prompt_sets if s.name == recipe.evaluation.gate_set)


def _variant(name: str, overrides: list[str], recipe: Recipe, extra: list[str]) -> Recipe:
    """The recipe with `extra`, evaluated greedy on the gate set alone (the comparison's common prompts)."""
    only_gate_set = json.dumps([_gate_set(recipe).model_dump(mode="json")])
    return load_recipe(name, [*overrides, *extra, f"evaluation.prompt_sets={only_gate_set}",
                              "evaluation.temperatures=[0]", "evaluation.ngram_baseline=false"])


def evaluation_report(results: dict[str, StageResult]) -> dict[str, Any]:
    return json.loads(output_of(results, "evaluate", EvaluationArtifact).report.read_text())


def report_row(report: dict[str, Any], set_name: str, temperature: float = 0.0) -> dict[str, Any]:
    return next(r for r in report["rows"] if r["set"] == set_name and r["temperature"] == temperature)


def stages_section(results: dict[str, StageResult]) -> Section:
    section = Section("Pipeline stages: wall time when each ran (MLflow run times)",
                      ["stage", "wall s", "this run"])
    for name, result in results.items():
        section.add(name, stage_seconds(result.mlflow_run_id) or "-", "cached" if result.skipped else "ran")
    section.notes.append("Stages whose outputs already existed are skipped; their time is that of the run that made "
                         "them. `python -m jobs.bench --recipe RECIPE --rebuild` builds the base afresh; delete runs/ "
                         "to time every stage.")
    return section


def quantization_section(results: dict[str, StageResult]) -> Section:
    section = Section("Quantization: validation of the same batches, bf16 -> FP8 PTQ -> QAT",
                      ["model", "loss", "acc step 1", "acc step 2", "acc step 3"])
    qat = output_of(results, "qat", QatArtifact)
    report = qat.report or {}
    for label, metrics in report.items():
        section.add(label, metrics.get("loss"), *(metrics.get(f"acc_step{i}", "-") for i in (1, 2, 3)))
    section.notes.append(f"PTQ {stage_seconds(results['quantize'].mlflow_run_id) or 0:.0f} s, QAT "
                         f"{qat.steps} steps {stage_seconds(results['qat'].mlflow_run_id) or 0:.0f} s "
                         "(ModelOpt fake quantization, Ray Train + DeepSpeed).")
    return section


def evaluation_section(report: dict[str, Any]) -> Section:
    k = report["num_speculative_tokens"]
    section = Section(f"Evaluation through vLLM (CPU): {report['model']}, {k} speculative tokens",
                      ["set", "temp", "acceptance length", "per position", "n-gram acceptance", "draft / n-gram",
                       "tokens/s base", "tokens/s draft", "tokens/s n-gram", "speedup draft", "speedup n-gram",
                       "TPOT ms base / draft", "greedy identical"])
    for r in report["rows"]:
        d, b, n = r[DRAFT], r[BASE], r.get(NGRAM, {})
        section.add(r["set"], r["temperature"], d["acceptance_length"],
                    " / ".join(f"{x:.2f}" for x in d["acceptance_rate_per_position"]), n.get("acceptance_length", "-"),
                    r.get("draft_vs_ngram_acceptance", "-"), b["output_tokens_per_s"], d["output_tokens_per_s"],
                    n.get("output_tokens_per_s", "-"), d.get("speedup_vs_base"), n.get("speedup_vs_base", "-"),
                    f"{b['tpot_ms']:.2f} / {d['tpot_ms']:.2f}" if b.get("tpot_ms") and d.get("tpot_ms") else "-",
                    d.get("greedy_identical", "-") if r["temperature"] == 0 else "-")
    sets = ", ".join(f"{name} ({s['conversations']} conversations, {s['user_turns']} user turns)"
                     for name, s in report["prompt_sets"].items())
    section.notes.append(
        f"Prompt sets: {sets}; up to {report['max_tokens']} tokens per answer, {report['concurrency']} request(s) "
        "in flight; acceptance length = 1 + accepted / drafts (vLLM's counters), at most k + 1. The FP8 draft runs "
        "in vLLM's CPU build as its dequantized variant (FP8-rounded weights in bf16: CPU vLLM has no FP8 kernels).")
    return section


def _comparison_row(section: Section, label: str, row: dict[str, Any], config: str = DRAFT) -> None:
    d = row[config]
    section.add(label, d["acceptance_length"], " / ".join(f"{x:.2f}" for x in d["acceptance_rate_per_position"]),
                d.get("speedup_vs_base", "-"), d.get("greedy_identical", "-"))


def speculation_sections(recipe_name: str, overrides: list[str]) -> list[Section]:
    recipe = load_recipe(recipe_name, overrides)
    main = run_recipe(recipe, until="evaluate")
    bf16 = run_recipe(_variant(recipe_name, overrides, recipe, ["quantization.format=none"]), until="evaluate")
    # Every other registered algorithm on the same data and prompts, unquantized (its own defaults otherwise).
    others = {name: run_recipe(_variant(recipe_name, overrides, recipe, [
        f"draft.algorithm={name}", "quantization.format=none",
        *([] if algorithm.capabilities.draft_vocabulary else ["draft.eagle.draft_vocab_size=null"])]),
        until="evaluate") for name, algorithm in ALGORITHMS.items() if name != recipe.draft.algorithm}
    gate_set, k = recipe.evaluation.gate_set, recipe.evaluation.num_speculative_tokens
    main_report, bf16_report = evaluation_report(main), evaluation_report(bf16)

    # The bf16 export's TensorRT-LLM variant keeps ModelOpt's aux-layer numbering; vLLM counts one higher.
    draft = from_export(output_of(bf16, "export", ExportArtifact).export_dir,
                        output_of(bf16, "base", BaseArtifact).model_dir)
    sets = load_sets(recipe.evaluation, draft.heldout_file(), bf16["evaluate"].directory / "aux-numbering",
                     only=gate_set)
    runs = plan_runs(sets, [0.0], recipe.evaluation)
    unshifted = {"method": "eagle3", "model": str(draft.export_dir / "draft"), "num_speculative_tokens": k}
    unshifted_row = summarize(run_configurations(draft.base_dir, {BASE: None, DRAFT: unshifted}, runs,
                                                 eval_device(recipe), recipe.vllm), runs, k)[0]

    comparison = Section(f"Algorithms and precision: {gate_set}, greedy, {k} speculative tokens (same prompts)",
                         ["configuration", "acceptance length", "per position", "speedup vs base",
                          "greedy identical"])
    fp8_row, bf16_row = report_row(main_report, gate_set), report_row(bf16_report, gate_set)
    _comparison_row(comparison, "EAGLE-3, QAT FP8 (the recipe)", fp8_row)
    _comparison_row(comparison, "EAGLE-3, bf16 (no quantization)", bf16_row)
    _comparison_row(comparison, "EAGLE-3, bf16, ModelOpt aux-layer ids (not shifted +1 for vLLM)", unshifted_row)
    for name, results in others.items():
        _comparison_row(comparison, f"{ALGORITHMS[name].description.split(':')[0]}, bf16",
                        report_row(evaluation_report(results), gate_set))
    if NGRAM in fp8_row:
        _comparison_row(comparison, "n-gram prompt lookup (vLLM, no draft model)", fp8_row, NGRAM)
    comparison.notes += ["The same base, synthesized data and training settings for every draft; the other "
                         "algorithms and the bf16 EAGLE-3 draft skip quantization, so the QAT draft has trained "
                         f"{recipe.quantization.qat.steps} steps more. Speedups are single runs on a noisy 2-core "
                         "machine: read them to about +-0.15."]

    targets = Section("Targets (issue 6): EAGLE-3, 3 speculative tokens, greedy, in-domain held-out prompts",
                      ["target", "measured", "met"])
    acceptance = fp8_row[DRAFT]["acceptance_length"]
    targets.add(f"mean acceptance length >= {TARGET_ACCEPTANCE}", acceptance, acceptance >= TARGET_ACCEPTANCE)
    vs_ngram = fp8_row.get("draft_vs_ngram_acceptance")
    if vs_ngram is not None:
        targets.add(f">= {TARGET_VS_NGRAM}x the n-gram baseline's acceptance length", vs_ngram,
                    vs_ngram >= TARGET_VS_NGRAM)
    ratio = acceptance / bf16_row[DRAFT]["acceptance_length"]
    targets.add("QAT FP8 within 3% of bf16 (acceptance length ratio)", ratio, ratio >= 1 - TARGET_QAT_LOSS)
    return [stages_section(main), quantization_section(main), evaluation_section(main_report), comparison, targets]
