"""Status of a recipe: which stages ran, when, their key figures and folders, and the registry's versions.

    draftsmith status --recipe tiny-eagle3
    draftsmith status --recipe llama3.1-8b-eagle3 --set output_dir=/mnt/shared/draftsmith/runs

A stage's folder is the one the pipeline would use for the recipe's settings now (its fingerprint), so a stage
whose settings changed shows as not run, with how many folders of other settings it has. Runs nothing.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from draftsmith.cli import parse_recipe, recipe_parser

if TYPE_CHECKING:
    from draftsmith.pipeline.stage import FinishedRun
    from draftsmith.recipe.schema import Recipe

REGISTRY_VERSIONS_SHOWN = 10


@dataclass(frozen=True)
class StageStatus:
    """One stage of a recipe, as its folder for the current settings stands."""

    name: str
    directory: Path
    used: bool  # False: the recipe does not use this stage (e.g. `features` with online training)
    finished: FinishedRun | None
    finished_at: str | None
    outdated: str | None  # a marker another draftsmith version wrote: why it does not read (the stage runs again)
    other_folders: list[str]  # this stage's finished folders for other settings


def stage_statuses(recipe: Recipe) -> list[StageStatus]:
    """Every pipeline stage's folder for `recipe`'s settings, and what its done marker says; computes fingerprints
    the way the pipeline does (each from its settings and its inputs' fingerprints), so nothing has to have run."""
    from draftsmith.pipeline.artifacts import Artifact
    from draftsmith.pipeline.runner import stage_dir
    from draftsmith.pipeline.stage import DONE_MARKER, OutdatedMarker, StageResult, read_marker
    from draftsmith.stages import pipeline_stages

    upstream: dict[str, StageResult] = {}
    statuses = []
    for stage in pipeline_stages():
        if not stage.enabled(recipe):
            statuses.append(StageStatus(stage.name, recipe.run_dir(), False, None, None, None, []))
            continue
        fingerprint = stage.fingerprint(recipe, upstream)
        directory = stage_dir(recipe, stage, fingerprint)
        finished, outdated = None, None
        try:
            finished = stage.read_done(directory)
        except OutdatedMarker as exc:
            outdated = str(exc)
        record = read_marker(directory) if finished else None
        others = sorted(p.parent.name for p in recipe.run_dir().glob(f"{stage.name}-*/{DONE_MARKER}")
                        if p.parent != directory and re.fullmatch(rf"{stage.name}-[0-9a-f]+", p.parent.name))
        statuses.append(StageStatus(stage.name, directory, True, finished,
                                    record.get("finished_at") if record else None, outdated, others))
        # Only the fingerprint travels downstream; an unfinished stage's outputs are not needed to name the next.
        upstream[stage.name] = StageResult(stage.name, fingerprint, directory,
                                           finished.artifact if finished else Artifact())
    return statuses


def format_stages(recipe: Recipe, statuses: list[StageStatus], recipe_args: list[str]) -> str:
    """The stages as lines; `recipe_args` (`--recipe R --set ...` as given) make the command that runs the rest."""
    from draftsmith.pipeline.summary import key_figures

    width = max(len(s.name) for s in statuses)
    lines = [f"{recipe.name}: stages for its current settings under {recipe.run_dir()}/", ""]
    for s in statuses:
        if not s.used:
            lines.append(f"{s.name:<{width}}  not used by this recipe")
            continue
        others = f" ({len(s.other_folders)} finished folder(s) of other settings)" if s.other_folders else ""
        if s.finished is None:
            why = f"runs again: its marker is from another draftsmith version ({s.outdated})" if s.outdated else \
                "not run for these settings"
            lines.append(f"{s.name:<{width}}  {why}{others}")
            continue
        when = (s.finished_at or "?").replace("T", " ")
        lines.append(f"{s.name:<{width}}  done {when}  {s.directory}{others}")
        lines.append(f"{'':<{width}}  {key_figures(s.finished.artifact)}")
    done = sum(1 for s in statuses if s.finished is not None)
    used = sum(1 for s in statuses if s.used)
    rest = "" if done == used else f"; `draftsmith pipeline {shlex.join(recipe_args)}` runs the rest"
    lines += ["", f"{done} of {used} stages done{rest}"]
    return "\n".join(lines)


def registry_status(recipe: Recipe) -> str:
    """The registered model's latest versions and their aliases; one line saying why when MLflow cannot tell."""
    from draftsmith import tracking

    name = recipe.tracking.registry_name
    uri = tracking.resolve_tracking_uri(recipe.tracking, recipe.output_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"registry {name}: no MLflow database at {uri} yet (nothing tracked there)"
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingError as exc:
        return f"registry {name}: MLflow unreachable, versions not shown ({exc})"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        # Search results leave `aliases` empty; the registered model holds them (alias -> version).
        aliases = client.get_registered_model(name).aliases if versions else {}
    except MlflowException as exc:
        return f"registry {name} at {uri}: cannot list versions ({exc.message})"
    if not versions:
        return f"registry {name} at {uri}: no versions yet"
    versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    lines = [f"registry {name} at {uri} ({len(versions)} versions" +
             (f", latest {REGISTRY_VERSIONS_SHOWN} shown):" if len(versions) > REGISTRY_VERSIONS_SHOWN else "):")]
    for v in versions[:REGISTRY_VERSIONS_SHOWN]:
        named = ", ".join(sorted(by_version.get(str(v.version), []))) or "-"
        lines.append(f"  v{v.version:<4} {named:<22} run {v.run_id}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.set_defaults(log_level="WARNING")  # a report, not a run: no library chatter
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    recipe_args = ["--recipe", args.recipe, *(a for o in args.overrides for a in ("--set", o))]
    print(format_stages(recipe, stage_statuses(recipe), recipe_args))
    print()
    print(registry_status(recipe))
    return 0
