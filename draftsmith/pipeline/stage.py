"""A pipeline stage: declared settings and inputs, a fingerprinted output folder, skipped when already done."""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftsmith.recipe.loader import as_jsonable, settings_hash
from draftsmith.recipe.schema import Recipe

DONE_MARKER = "_DONE.json"


@dataclass
class StageResult:
    """What a finished stage hands downstream: its folder, fingerprint and named outputs."""

    name: str
    fingerprint: str
    directory: Path
    outputs: dict[str, Any]
    skipped: bool = False
    mlflow_run_id: str | None = None


@dataclass
class StageContext:
    """What a running stage may use: the recipe, finished upstream stages, and the MLflow run of this stage."""

    recipe: Recipe
    upstream: dict[str, StageResult] = field(default_factory=dict)
    mlflow_run_id: str | None = None


class Stage(ABC):
    """One step of the flow. Subclasses name their settings and upstream stages and implement `run`.

    The fingerprint covers the stage's version, its settings and its inputs' fingerprints, so changing any of
    them gives a new output folder and a re-run, while an unchanged stage whose folder holds the done marker is
    skipped. Bump `version` when the stage's code changes what it writes.
    """

    name: str = ""
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
    def run(self, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
        """Do the work into `out_dir` (which may hold a previous partial attempt) and return named outputs."""

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


def read_done(directory: Path) -> dict[str, Any] | None:
    marker = directory / DONE_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def write_done(directory: Path, record: dict[str, Any]) -> None:
    """Write the done marker atomically: a crash leaves either no marker or a whole one."""
    record = {**record, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = directory / f".{DONE_MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, directory / DONE_MARKER)
