"""What a pipeline run built, as a person reads it: each stage's key figures in a line, and the end-of-run summary.

Every figure comes from the stages' typed artifacts (and the evaluation report an `EvaluationArtifact` names, for
the speedups); nothing is measured or looked up here, so the summary of a run is the same wherever it is printed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from draftsmith.evaluation.measure import DRAFT
from draftsmith.pipeline.artifacts import (Artifact, BaseArtifact, ConvertArtifact, DatasetArtifact,
                                           EvaluationArtifact, ExportArtifact, FeaturesArtifact, PromptsArtifact,
                                           QatArtifact, QuantizeArtifact, RegistrationArtifact, SynthesisArtifact,
                                           TrainArtifact)
from draftsmith.pipeline.stage import StageResult

SUMMARY_JSON = "pipeline.json"  # in OUTPUT_DIR/RECIPE/: every stage's outputs of the latest pipeline run


def _val_accuracy(metrics: Mapping[str, float]) -> str:
    steps = sorted(k for k in metrics if k.startswith("val/acc"))
    if not steps:
        return ""
    return ", validation accuracy " + " / ".join(f"{metrics[k]:.2f}" for k in steps)


def _round_trip(export: ExportArtifact) -> str:
    trip = export.verification
    if trip is None:
        return "no vLLM round trip"
    same = "greedy identical" if trip.identical else f"greedy DIFFERS on prompts {trip.mismatched_prompts}"
    acceptance = f", acceptance {trip.acceptance_length:.2f}" if trip.acceptance_length is not None else ""
    return f"round trip on {trip.prompts} prompts: {same}{acceptance}"


def _gate(registration: RegistrationArtifact) -> str:
    if registration.gate is None:
        return "no promotion gate (evaluation.gate: false)"
    verdict = "promoted" if registration.gate.promoted else "not promoted"
    return f"gate: {verdict}: {registration.gate.reason}"


FIGURES: dict[type[Artifact], Callable[[Any], str]] = {
    BaseArtifact: lambda a: f"{'embedded base' if a.embedded else 'base'} {a.model_dir}",
    PromptsArtifact: lambda a: (f"{len(a.sources)} prompt file(s)"
                                f"{', held-out prompts' if a.heldout else ''}{', generated' if a.generated else ''}"),
    SynthesisArtifact: lambda a: f"{a.written} conversations written of {a.read} read, {a.quarantined} quarantined",
    DatasetArtifact: lambda a: (f"{a.train} train / {a.validation} validation conversations, {a.tokens:,} tokens, "
                                f"{a.quarantined} quarantined"),
    ConvertArtifact: lambda a: (f"{a.algorithm}, {a.draft_parameters:,} draft parameters, "
                                f"vocabulary {a.draft_vocab_size} of {a.base_vocab_size}"),
    FeaturesArtifact: lambda a: f"{a.tokens:,} tokens of base states, {a.bytes / 2**30:.2f} GiB in {a.dtype}",
    TrainArtifact: lambda a: (f"{a.steps} steps ({a.base_features}){_val_accuracy(a.metrics)}"
                              f"{f', resumed at {a.resumed_from}' if a.resumed_from else ''}"),
    QuantizeArtifact: lambda a: (f"{a.quantization.format}" + (" + KV cache" if a.quantization.kv_cache else "")
                                 if a.quantization else "not quantized"),
    QatArtifact: lambda a: f"{a.steps} QAT steps" if a.steps else "no QAT",
    ExportArtifact: lambda a: (f"{a.algorithm} for {', '.join(sorted(a.engine_configs)) or 'no runtime'}; "
                               f"{_round_trip(a)}"),
    EvaluationArtifact: lambda a: ("acceptance length " + ", ".join(
        f"{name} {value:.2f}" if value is not None else f"{name} -" for name, value in a.acceptance_length.items())
        + ("" if a.greedy_identical else "; greedy output DIFFERS from the base's")),
    RegistrationArtifact: lambda a: f"{a.name} v{a.version} -> {a.alias or 'no alias'}; {_gate(a)}",
}


def key_figures(artifact: Artifact) -> str:
    """A stage's outputs in one line: what `draftsmith status` prints beside each stage."""
    figures = FIGURES.get(type(artifact))
    return figures(artifact) if figures else type(artifact).__name__


def speedups(evaluation: EvaluationArtifact) -> dict[str, float]:
    """'SET@t=TEMP' -> the draft's output tokens/s over the base's, from the report the artifact names; empty when the
    report is no longer there."""
    if not Path(evaluation.report).is_file():
        return {}
    report = json.loads(Path(evaluation.report).read_text())
    out = {}
    for row in report["rows"]:
        ratio = row.get(DRAFT, {}).get("speedup_vs_base")
        if ratio is not None:
            out[f"{row['set']}@t={row['temperature']:g}"] = ratio
    return out


def _output(results: Mapping[str, StageResult], name: str, kind: type[Any]) -> Any:
    result = results.get(name)
    return result.outputs if result is not None and isinstance(result.outputs, kind) else None


def _built(results: Mapping[str, StageResult]) -> str | None:
    convert = _output(results, "convert", ConvertArtifact)
    if convert is None:
        return None
    parts = [f"{convert.algorithm} draft"]
    train = _output(results, "train", TrainArtifact)
    if train is not None:
        parts.append(f"trained {train.steps} steps{_val_accuracy(train.metrics)}")
    quantize = _output(results, "quantize", QuantizeArtifact)
    if quantize is not None:
        qat = _output(results, "qat", QatArtifact)
        qat_steps = f" + {qat.steps} QAT steps" if qat is not None and qat.steps else ""
        parts.append(f"{quantize.quantization.format}{qat_steps}" if quantize.quantization else "not quantized")
    base = _output(results, "base", BaseArtifact)
    if base is not None:
        parts.append(f"for the {'embedded base' if base.embedded else 'base'} {base.model_dir}")
    return ", ".join(parts)


def _next_commands(recipe_args: list[str], tracking_uri: str, registration: RegistrationArtifact | None
                   ) -> list[tuple[str, str]]:
    recipe = shlex.join(recipe_args)
    if registration is None:
        return [(f"draftsmith pipeline {recipe}", "run the remaining stages (finished ones are skipped)"),
                (f"draftsmith status {recipe}", "what has run, and the registry")]
    steps = []
    if registration.alias != "champion":
        steps.append((f"draftsmith register {recipe} --promote {registration.version} --alias champion",
                      "make this version the champion anyway"))
    # deploy's --set sets the Serve app's args, not the recipe's: an overridden recipe names its registry instead.
    deploy = shlex.join(recipe_args[:2] + (["--tracking-uri", tracking_uri] if len(recipe_args) > 2 else []))
    steps += [
        (f"draftsmith ui {recipe}", "browse the runs, metrics and registry in the MLflow UI"),
        (f"draftsmith deploy {deploy}", "serve the champion on a running Ray (`ray start --head`)"),
        ("draftsmith chat", "talk to the served endpoint (http://127.0.0.1:8000/v1), streaming"),
    ]
    return steps


def _table(rows: list[tuple[str, str]], width: int) -> list[str]:
    return [f"{label:<{width}}  {text}" for label, text in rows]


def run_summary(recipe_args: list[str], run_dir: Path, results: Mapping[str, StageResult], tracking_uri: str,
                experiment: str, json_file: Path | None = None) -> str:
    """The end of a pipeline run: what was built, the registered version and its alias with the gate's reason,
    acceptance length (and speedup against the base, where measured) per prompt set, where the artifacts and the
    MLflow runs are, and the commands to run next. `recipe_args` are the run's `--recipe R [--set K=V ...]`, which
    the next commands repeat; `run_dir` is OUTPUT_DIR/RECIPE_NAME."""
    ran = [name for name, r in results.items() if not r.skipped]
    blocks = [[f"draftsmith pipeline {run_dir.name}: {len(results)} stages done "
               f"({len(ran)} ran now{': ' + ', '.join(ran) if ran else ''}; {len(results) - len(ran)} found done)"]]
    rows: list[tuple[str, str]] = []
    built = _built(results)
    if built:
        rows.append(("built", built))
    export = _output(results, "export", ExportArtifact)
    if export is not None:
        rows.append(("export", f"{export.export_dir} ({_round_trip(export)})"))
    registration = _output(results, "register", RegistrationArtifact)
    if registration is not None:
        reused = " (already registered)" if registration.reused else ""
        rows.append(("registered", f"{registration.model_uri}{reused} -> alias {registration.alias or 'none'}"))
        rows.append(("", _gate(registration)))
    if registration is None:  # a run stopped early (--until): what each stage it ran handed on
        rows = [(name, key_figures(r.outputs)) for name, r in results.items()]
    width = max([len(label) for label, _ in rows] + [len("outputs")])
    if rows:
        blocks.append(_table(rows, width))

    evaluation = _output(results, "evaluate", EvaluationArtifact)
    if evaluation is not None:
        ratio = speedups(evaluation)
        lines = ["acceptance length per prompt set" + (", speedup against the base" if ratio else "") + ":"]
        name_width = max(len(n) for n in evaluation.acceptance_length)
        for name, value in evaluation.acceptance_length.items():
            accepted = f"{value:.2f}" if value is not None else "-"
            measured = f"   {ratio[name]:.2f}x" if name in ratio else ""
            lines.append(f"  {name:<{name_width}}  {accepted:>5}{measured}")
        if not evaluation.greedy_identical:
            lines.append("  greedy output with the draft differs from the base's (see the evaluation report)")
        blocks.append([*lines, f"  report: {evaluation.markdown}"])

    stage_run = next((r for r in reversed(list(results.values())) if r.mlflow_run_id), None)
    blocks.append(_table([
        ("outputs", f"{run_dir}/STAGE-FINGERPRINT/" + (f" (every stage's outputs as JSON: {json_file})"
                                                        if json_file else "")),
        ("mlflow", f"{tracking_uri}, experiment {experiment}"
                   + (f", run {stage_run.mlflow_run_id} (stage {stage_run.name})" if stage_run else "")),
    ], width))
    commands = _next_commands(recipe_args, tracking_uri, registration)
    command_width = max(len(c) for c, _ in commands)
    blocks.append(["next:", *(f"  {command:<{command_width}}  # {why}" for command, why in commands)])
    return "\n\n".join("\n".join(block) for block in blocks)
