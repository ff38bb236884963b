"""Where the served model comes from: a registered version (downloaded on the replica) or an export folder.

`pin()` runs where the app is deployed: it turns `models:/NAME@ALIAS` into the version the alias points at now,
so a Serve config names one exact version and redeploying after the alias moved rolls the replicas over.
`materialize()` runs on each engine replica: it downloads that version once per machine (or opens the folder)
and returns what the engines need.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from draftsmith.recipe.schema import ServingSettings

if TYPE_CHECKING:
    from draftsmith.export.manifest import ExportManifest

# The export code (and with it transformers' model registry, 7-11 s of imports on 2 cores) is imported where a
# model is opened: the deploy job, Serve's build task and the ingress replica import this module and never do.

log = logging.getLogger(__name__)


class ModelSourceError(ValueError):
    """The model reference cannot be resolved; says which reference and how to fix it."""


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, ref: str) -> RegistryRef:
        body = ref.removeprefix("models:/")
        if "@" in body:
            name, _, alias = body.partition("@")
            if name and alias:
                return cls(name, alias=alias)
        else:
            name, _, version = body.partition("/")
            if name and version.isdigit():
                return cls(name, version=version)
        raise ModelSourceError(f"model_ref {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


def default_model_id(settings: ServingSettings) -> str:
    if settings.model_id:
        return settings.model_id
    ref = required_ref(settings)
    if is_registry_ref(ref):
        return RegistryRef.parse(ref).name
    path = Path(ref).resolve()
    return path.parent.name if path.name == "export" else path.name


def required_ref(settings: ServingSettings) -> str:
    if not settings.model_ref:
        raise ModelSourceError("serving.model_ref is not set: give models:/NAME@ALIAS, models:/NAME/VERSION or an "
                               "export folder")
    return settings.model_ref


def _client(settings: ServingSettings):
    import mlflow
    from mlflow import MlflowClient

    if settings.tracking_uri:
        mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient()


def _check_registry_reachable(uri: str) -> None:
    # MLflow's client retries an unreachable server for minutes before it says anything (and then that the
    # version is not registered): ask /health once, with a short timeout, first.
    from draftsmith.tracking import TrackingError, check_reachable

    try:
        check_reachable(uri)
    except TrackingError as exc:
        raise ModelSourceError(f"the registry cannot be reached: {exc}") from None


def pin(settings: ServingSettings) -> ServingSettings:
    """Settings with `model_version` set to the version `model_ref` names now (unchanged for an export folder)."""
    from mlflow.exceptions import MlflowException

    ref = required_ref(settings)
    if not is_registry_ref(ref):
        if not Path(ref, "manifest.json").is_file():
            raise ModelSourceError(f"model_ref {ref}: neither models:/... nor an export folder (no manifest.json)")
        return settings.model_copy(update={"model_ref": str(Path(ref).resolve()), "model_version": None})
    parsed = RegistryRef.parse(ref)
    client = _client(settings)
    _check_registry_reachable(client.tracking_uri)
    try:
        if parsed.alias:
            version = client.get_model_version_by_alias(parsed.name, parsed.alias).version
        else:
            version = client.get_model_version(parsed.name, parsed.version).version
    except MlflowException as exc:
        raise ModelSourceError(f"model_ref {ref}: not in the registry at {client.tracking_uri} ({exc.message}); "
                               "register the export first (jobs.register) or fix the alias") from None
    return settings.model_copy(update={"model_version": str(version)})


@dataclass
class ServedModel:
    """A model on this replica's disk, ready for an engine."""

    model_id: str
    base_dir: Path
    export_dir: Path
    version: str | None
    manifest: ExportManifest

    def card(self) -> dict[str, Any]:
        """What /v1/models says about the model, besides its id."""
        return {"registry_version": self.version, "algorithm": self.manifest.algorithm,
                "quantization": self.manifest.quantization_format, "max_draft_len": self.manifest.max_draft_len}

    def vllm_speculative_config(self, settings: ServingSettings, device: str) -> dict[str, Any] | None:
        from draftsmith.export.bundle import export_engine_config
        from draftsmith.export.engine_configs import vllm_runtime_config

        if not settings.speculative:
            return None
        config = export_engine_config(self.export_dir, "vllm", device=device)
        if config is None:
            raise ModelSourceError(f"{self.model_id}: this {self.manifest.algorithm} export has no draft vLLM "
                                   "can load; serve it with engine: trtllm or speculative: false")
        if settings.num_speculative_tokens:
            config["num_speculative_tokens"] = settings.num_speculative_tokens
        return vllm_runtime_config(config)

    def trtllm_options(self) -> dict[str, Any]:
        from draftsmith.export.bundle import export_engine_config

        config = export_engine_config(self.export_dir, "trtllm")
        if config is None:
            raise ModelSourceError(f"{self.model_id}: this {self.manifest.algorithm} export has no TensorRT-LLM "
                                   "config (see the export's manifest: engines_without_config)")
        return config


def download_root(settings: ServingSettings) -> Path:
    """Where replicas keep downloaded versions: the setting, else a folder of this user's in the temp dir. Either
    must be writable by this user alone: whoever else could write there could swap the weights or the
    completion marker that replicas trust."""
    if settings.download_dir:
        return _private_folder(Path(settings.download_dir), "serving.download_dir", strict=False)
    return _private_folder(Path(tempfile.gettempdir()) / f"draftsmith-serve-{os.getuid()}", "the download folder",
                           strict=True)


def _private_folder(root: Path, what: str, *, strict: bool) -> Path:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.lstat()
    writable_by_others = info.st_mode & (0o022 if strict else 0o002)
    if root.is_symlink() or info.st_uid != os.getuid() or writable_by_others:
        raise ModelSourceError(f"{what} {root} is not private to this user (owner uid {info.st_uid}, mode "
                               f"{oct(info.st_mode & 0o777)}, symlink {root.is_symlink()}): downloaded models are "
                               "trusted from there; use a folder only you can write (chmod 700) or set "
                               "serving.download_dir")
    return root


def tree_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def _verified_download(target: Path, marker: Path) -> bool:
    """Whether `target` is exactly what was downloaded when `marker` was written (each file's digest)."""
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no marker, or one from before digests were recorded
    return target.is_dir() and tree_digests(target) == recorded


def materialize(settings: ServingSettings) -> ServedModel:
    """The pinned model on local disk: downloaded once per machine and version (replicas share it under a lock),
    and reused only while every file still has the digest recorded at download."""
    from draftsmith.evaluation.evaluate import from_export, from_registry, open_downloaded_version
    from draftsmith.export.manifest import read_manifest

    ref = required_ref(settings)
    model_id = default_model_id(settings)
    if not is_registry_ref(ref):
        draft = from_export(ref)
        return ServedModel(model_id, draft.base_dir, draft.export_dir, None, read_manifest(draft.export_dir))
    parsed = RegistryRef.parse(ref)
    version = settings.model_version or parsed.version
    if version is None:
        version = pin(settings).model_version
    _client(settings)  # points MLflow at the registry
    root = download_root(settings)
    target = root / f"{parsed.name}-v{version}"
    with open(root / f".{parsed.name}-v{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas on one machine download a version once
        marker = root / f".{parsed.name}-v{version}.complete"
        if _verified_download(target, marker):
            draft = open_downloaded_version(next(target.rglob("MLmodel")).parent)
        else:
            if target.exists():
                log.warning("%s does not match its recorded digests (or has none): downloading it again", target)
                shutil.rmtree(target)
            marker.unlink(missing_ok=True)
            log.info("downloading models:/%s/%s to %s", parsed.name, version, target)
            draft = from_registry(f"models:/{parsed.name}/{version}", target)
            marker.write_text(json.dumps({"export_dir": str(draft.export_dir), "files": tree_digests(target)}))
    return ServedModel(model_id, draft.base_dir, draft.export_dir, str(version), read_manifest(draft.export_dir))


def resolve_device(settings: ServingSettings) -> str:
    if settings.device != "auto":
        return settings.device
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def replica_env(settings: ServingSettings) -> dict[str, str]:
    """Environment the replicas need: the registry's address, vLLM's CPU KV-cache size."""
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env
