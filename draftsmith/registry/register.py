"""Register an export as a new version of the recipe's registered model, with its lineage, as a pyfunc.

One registered model holds one algorithm: a name already used for another algorithm is refused before anything
is logged. A version carries the export folder (draft variants, quantized base, engine configs), the recipe and
the base as artifacts of an MLflow pyfunc, and lineage tags. Registering the same export again (a re-run after a
crash) finds the existing version by its export digest instead of adding a second one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from draftsmith import tracking
from draftsmith.export.manifest import read_manifest
from draftsmith.registry.speculative_pyfunc import installed_version

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
ALGORITHM_TAG = "draftsmith.algorithm"
DIGEST_TAG = "draftsmith.export_digest"
ALIASES = ("champion", "challenger")


class RegistryError(ValueError):
    """The registry refuses this version (name taken by another algorithm, unknown alias); nothing was written."""


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None


def check_registry_name(name: str, algorithm: str) -> None:
    model = _registered_model(MlflowClient(), name)
    if model is not None and model.tags.get(ALGORITHM_TAG, algorithm) != algorithm:
        raise RegistryError(
            f"registered model {name!r} holds {model.tags[ALGORITHM_TAG]} drafts, this one is {algorithm}; set "
            "tracking.registry_name to a name for this algorithm"
        )


def existing_version(name: str, digest: str):
    versions = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    return versions[0] if versions else None


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("max_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
)


def register_export(*, name: str, export_dir: Path, base_dir: Path, recipe_file: Path, tags: dict[str, str],
                    num_speculative_tokens: int, alias: str | None = None, bundle_base: bool = True
                    ) -> dict[str, Any]:
    """Log the pyfunc (in the active run) and register it as a new version of `name`; returns version info."""
    manifest = read_manifest(export_dir)
    algorithm, digest = manifest.algorithm, manifest.export_digest
    check_registry_name(name, algorithm)
    if alias is not None and alias not in ALIASES:
        raise RegistryError(f"alias {alias!r} is not one of {ALIASES}")
    client = MlflowClient()
    found = existing_version(name, digest)
    if found is not None:
        log.info("export %s is already version %s of %s", digest, found.version, name)
        version = found
    else:
        info = mlflow.pyfunc.log_model(
            # No code_paths: the stored model file imports the installed draftsmith (see pyfunc_model.py).
            name="model", python_model=str(PYFUNC_FILE),
            artifacts={"export": str(export_dir), "recipe": str(recipe_file),
                       **({"base": str(base_dir)} if bundle_base else {})},
            # Every key a loader may override must be here (MLflow ignores unknown ones with a warning): compiled,
            # the engine core in a process of its own, the dtype vLLM picks, by default.
            model_config={"num_speculative_tokens": num_speculative_tokens, "base_model": str(base_dir),
                          "enforce_eager": False, "in_process": False, "dtype": "auto",
                          "draftsmith_version": installed_version()},
            signature=SIGNATURE,
            pip_requirements=["mlflow", "vllm", "torch", "transformers", "safetensors", "pyyaml", "pydantic"],
        )
        if _registered_model(client, name) is None:
            client.create_registered_model(name, tags={ALGORITHM_TAG: algorithm},
                                           description="Speculative-decoding drafts exported by draftsmith.")
        version = mlflow.register_model(info.model_uri, name, tags={**tags, DIGEST_TAG: digest,
                                                                    ALGORITHM_TAG: algorithm})
    if alias is not None:
        set_alias(name, alias, str(version.version))
    return {"name": name, "version": str(version.version), "model_uri": f"models:/{name}/{version.version}",
            "alias": alias, "reused": found is not None}


def set_alias(name: str, alias: str, version: str) -> None:
    if alias not in ALIASES:
        raise RegistryError(f"alias {alias!r} is not one of {ALIASES}")
    tracking.set_alias(name, alias, version)


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
