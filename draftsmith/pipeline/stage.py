"""A pipeline stage: declared settings and inputs, a fingerprinted output folder, skipped when already done."""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError

from draftsmith.pipeline.artifacts import Artifact
from draftsmith.recipe.loader import as_jsonable, settings_hash
from draftsmith.recipe.schema import Recipe

DONE_MARKER = "_DONE.json"

A = TypeVar("A", bound=Artifact)


@dataclass
class StageResult:
    """What a finished stage hands downstream: its folder, fingerprint and typed outputs."""

    name: str
    fingerprint: str
    directory: Path
    outputs: Artifact
    skipped: bool = False
    mlflow_run_id: str | None = None


def output_of(results: Mapping[str, StageResult], name: str, kind: type[A]) -> A:
    """Stage `name`'s artifact from `results`, checked to be a `kind`."""
    assert name in results, f"stage {name!r} has not run; finished stages: {sorted(results)}"
    artifact = results[name].outputs
    assert isinstance(artifact, kind), (f"stage {name!r} produced a {type(artifact).__name__}, not the "
                                        f"{kind.__name__} its reader expects")
    return artifact


@dataclass
class StageContext:
    """What a running stage may use: the recipe, finished upstream stages, and the MLflow run of this stage."""

    recipe: Recipe
    upstream: dict[str, StageResult] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    def input(self, name: str, kind: type[A]) -> A:
        """The artifact of upstream stage `name` (one of the stage's `depends_on`)."""
        return output_of(self.upstream, name, kind)

    def optional_input(self, name: str, kind: type[A]) -> A | None:
        """The artifact of upstream stage `name` (one of `optional_inputs`), or None when the recipe does not use
        that stage."""
        return output_of(self.upstream, name, kind) if name in self.upstream else None


class OutdatedMarker(Exception):
    """A done marker another version of draftsmith wrote: its outputs do not read as this stage's artifact."""


@dataclass(frozen=True)
class FinishedRun:
    """A done marker read back: the stage's artifact and the MLflow run that made it."""

    artifact: Artifact
    mlflow_run_id: str | None


class Stage(ABC):
    """One step of the flow. Subclasses name their settings and upstream stages and implement `run`.

    The fingerprint covers the stage's version, its settings and its inputs' fingerprints, so changing any of
    them gives a new output folder and a re-run, while an unchanged stage whose folder holds the done marker is
    skipped. Bump `version` when the stage's code changes what it writes.
    """

    name: str = ""
    artifact: ClassVar[type[Artifact]]  # what `run` returns
    version: int = 1
    depends_on: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()  # stages used when the recipe enables them (see `enabled`)

    @abstractmethod
    def settings(self, recipe: Recipe) -> Any:
        """The part of the recipe this stage's outputs depend on (a pydantic model, dict or list)."""

    def preflight(self, recipe: Recipe) -> None:
        """Checks that need the tracking server (run once it is configured, before any stage runs)."""
        return None

    def enabled(self, recipe: Recipe) -> bool:
        """Whether the recipe uses this stage; a stage it does not use is passed over, and stages that list it
        in `optional_inputs` run without it."""
        return True

    def needs_ray(self, recipe: Recipe) -> bool:
        """Whether running this stage uses Ray; a pipeline whose running stages need none starts no Ray (a re-run
        of finished work, say). True unless a stage knows better."""
        return True

    @abstractmethod
    def run(self, ctx: StageContext, out_dir: Path) -> Artifact:
        """Do the work into `out_dir` (which may hold a previous partial attempt) and return its `artifact`."""

    def fingerprint(self, recipe: Recipe, upstream: dict[str, StageResult]) -> str:
        missing = [d for d in self.depends_on if d not in upstream]
        assert not missing, f"stage {self.name} ran before its inputs {missing}"
        return settings_hash(
            {
                "stage": self.name,
                "version": self.version,
                "settings": as_jsonable(self.settings(recipe)),
                "inputs": {d: upstream[d].fingerprint for d in (*self.depends_on, *self.optional_inputs)
                           if d in upstream},
            }
        )

    def write_done(self, directory: Path, fingerprint: str, artifact: Artifact, mlflow_run_id: str | None) -> None:
        """Mark `directory` finished, with the artifact stored by its type's name and fields."""
        assert isinstance(artifact, self.artifact), (
            f"stage {self.name} returned a {type(artifact).__name__}, not its {self.artifact.__name__}")
        write_marker(directory, {"stage": self.name, "fingerprint": fingerprint, "artifact": type(artifact).__name__,
                                 "outputs": artifact.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id})

    def read_done(self, directory: Path) -> FinishedRun | None:
        """The finished run in `directory`, None when there is none; `OutdatedMarker` when its marker does not
        hold this stage's artifact (another type, or other fields)."""
        record = read_marker(directory)
        if record is None:
            return None
        kind = record.get("artifact")
        # A marker from before artifacts were typed has none recorded: it loads when its outputs are exactly this
        # artifact's fields (the keys were not renamed), so finished hours are kept; otherwise the stage re-runs.
        if kind is not None and kind != self.artifact.__name__:
            raise OutdatedMarker(f"artifact {kind}, expected {self.artifact.__name__}")
        try:
            artifact = self.artifact.model_validate(record.get("outputs"))
        except ValidationError as e:
            raise OutdatedMarker(validation_reason(e)) from e
        return FinishedRun(artifact, record.get("mlflow_run_id"))


def validation_reason(error: ValidationError) -> str:
    """The first of a validation error's problems in a few words (`missing field steps`, and how many more)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "outputs"
    kind = {"missing": "missing field", "extra_forbidden": "unknown field"}.get(first["type"])
    reason = f"{kind} {where}" if kind else f"field {where}: {first['msg']}"
    more = error.error_count() - 1
    return f"{reason} and {more} more" if more else reason


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The done marker's record in `directory`, None when there is none."""
    marker = directory / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def write_marker(directory: Path, record: dict[str, Any]) -> None:
    """Write the done marker atomically: a crash leaves either no marker or a whole one."""
    record = {**record, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = directory / f".{DONE_MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, directory / DONE_MARKER)
