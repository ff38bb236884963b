"""Evaluate an exported draft (a folder, or a registered version) on the recipe's prompt sets with vLLM."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from draftsmith.evaluation.measure import BASE, DRAFT, NGRAM, ngram_config, plan_runs, run_configurations, summarize
from draftsmith.evaluation.prompt_sets import load_prompt_set
from draftsmith.evaluation.report import write_report
from draftsmith.export.bundle import export_engine_config
from draftsmith.export.manifest import ExportManifest, read_manifest
from draftsmith.export.engine_configs import vllm_runtime_config
from draftsmith.recipe.schema import EvaluationSettings, VllmSettings

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


class EvaluationError(ValueError):
    """The draft cannot be evaluated as asked (no vLLM variant, unknown model reference); says why."""


@dataclass
class DraftUnderTest:
    """An export and the base it drafts for, wherever they came from."""

    label: str
    export_dir: Path
    base_dir: Path
    registry_version: dict[str, str] | None = None
    heldout: Path | None = None  # the prompts stage's held-out prompts, when the pipeline knows them

    def heldout_file(self) -> Path | None:
        """The held-out prompts of a set with no path: the prompts stage's, else the embedded base's (None for
        other bases)."""
        from draftsmith.embedded.build import HELDOUT_FILE

        if self.heldout is not None:
            return self.heldout
        path = self.base_dir / HELDOUT_FILE
        return path if path.is_file() else None

    @property
    def manifest(self) -> ExportManifest:
        return read_manifest(self.export_dir)

    def speculative_config(self, num_speculative_tokens: int, device: str) -> dict[str, Any]:
        config = export_engine_config(self.export_dir, "vllm", device=device)
        if config is None:
            raise EvaluationError(
                f"{self.label}: this {self.manifest.algorithm} export has no draft vLLM can load "
                f"({self.manifest.engines_without_config.get('vllm', 'no vLLM config')})")
        return vllm_runtime_config({**config, "num_speculative_tokens": num_speculative_tokens})


def from_export(export_dir: str | Path, base_dir: str | Path | None = None) -> DraftUnderTest:
    export_dir = Path(export_dir).resolve()
    manifest = read_manifest(export_dir)
    base = Path(base_dir or manifest.base_model.dir)
    if not (base / "config.json").is_file():
        raise EvaluationError(f"the base model {base} of export {export_dir} is not there; pass its folder "
                              "(--base) where it lives now")
    folder = export_dir.parent.name if export_dir.name == "export" else export_dir.name
    return DraftUnderTest(f"{folder} ({manifest.algorithm}, {manifest.quantization_format})", export_dir, base)


def from_registry(model_uri: str, download_dir: str | Path | None = None) -> DraftUnderTest:
    """A registered version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`), downloaded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from draftsmith import tracking

    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = model_uri.removeprefix("models:/").partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise EvaluationError(f"cannot resolve {model_uri} in the registry at {tracking.current_uri()}: "
                              f"{exc.message}") from None
    root = tracking.download_model_version(f"models:/{name}/{version.version}",
                                           download_dir or tempfile.mkdtemp(prefix="draftsmith-eval-"))
    draft = open_downloaded_version(root)
    draft.label = f"{name} v{version.version}"
    draft.registry_version = {"name": name, "version": str(version.version)}
    return draft


def open_downloaded_version(root: str | Path) -> DraftUnderTest:
    """A registered version downloaded to `root` (its MLmodel names the export and the bundled base)."""
    root = Path(root)
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    artifacts = {k: root / v["path"] for k, v in flavor.get("artifacts", {}).items()}
    base = artifacts.get("base") or Path(flavor.get("config", {}).get("base_model", ""))
    return from_export(artifacts["export"], base)


def resolve_draft(reference: str, base_dir: str | None = None) -> DraftUnderTest:
    if reference.startswith("models:/"):
        return from_registry(reference)
    if not Path(reference, "manifest.json").is_file():
        raise EvaluationError(f"{reference} is neither a models:/ reference nor an export folder (no manifest.json)")
    return from_export(reference, base_dir)


def load_sets(settings: EvaluationSettings, heldout_file: str | Path | None, out_dir: Path,
              only: str | None = None, limit: int | None = None) -> list:
    chosen = [s for s in settings.prompt_sets if only is None or s.name == only]
    return [load_prompt_set(s, heldout_file, out_dir / QUARANTINE_DIR, settings.max_bad_share, limit) for s in chosen]


def evaluate_draft(draft: DraftUnderTest, settings: EvaluationSettings, out_dir: Path, device: str = "cpu",
                   log_to_mlflow: bool = True, vllm: VllmSettings | None = None) -> dict[str, Any]:
    """The full evaluation: every prompt set at every temperature, base / draft / n-gram, written and logged."""
    k = settings.num_speculative_tokens
    sets = load_sets(settings, draft.heldout_file(), out_dir)
    runs = plan_runs(sets, settings.temperatures, settings)
    configs: dict[str, dict[str, Any] | None] = {BASE: None, DRAFT: draft.speculative_config(k, device)}
    if settings.ngram_baseline:
        configs[NGRAM] = ngram_config(settings)
    results = run_configurations(draft.base_dir, configs, runs, device, vllm)
    manifest = draft.manifest
    report = {"model": draft.label, "export_dir": str(draft.export_dir), "base_dir": str(draft.base_dir),
              "registry_version": draft.registry_version, "algorithm": manifest.algorithm,
              "quantization": manifest.quantization_format, "device": device,
              "num_speculative_tokens": k, "max_tokens": settings.max_tokens, "concurrency": settings.concurrency,
              "prompt_sets": {s.name: s.summary() for s in sets}, "rows": summarize(results, runs, k)}
    write_report(report, out_dir, log_to_mlflow)
    for row in report["rows"]:
        log.info("%s @ t=%g: acceptance length %s, %.0f tokens/s with the draft vs %.0f without", row["set"],
                 row["temperature"], row[DRAFT].get("acceptance_length"), row[DRAFT]["output_tokens_per_s"],
                 row[BASE]["output_tokens_per_s"])
    return report
