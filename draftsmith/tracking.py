"""The one module that talks to MLflow: runs, params, metrics, artifacts, plots, registry and aliases."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient

from draftsmith.provenance import provenance_tags
from draftsmith.recipe.schema import TrackingSettings

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 500
RUN_FILE = "_MLFLOW_RUN.json"  # in a stage's folder: the MLflow run of its latest attempt


class TrackingError(RuntimeError):
    """MLflow cannot be used as configured; the message says which URI and how to fix it."""


def resolve_tracking_uri(settings: TrackingSettings, output_dir: str | Path) -> str:
    """The recipe's URI, else $MLFLOW_TRACKING_URI, else a sqlite database under the output folder.

    A database backend (not a plain `mlruns/` folder) because the Model Registry needs one.
    """
    if settings.uri:
        return settings.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(output_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a fix, when the tracking backend cannot be reached."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({exc}). Start one with "
                "`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`, "
                "or set tracking.uri / $MLFLOW_TRACKING_URI to a running server, or unset both to use a local "
                "sqlite database."
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow database folder {db.parent}: {exc}") from None


def configure(settings: TrackingSettings, output_dir: str | Path) -> str:
    """Point MLflow at the recipe's backend and make sure its experiment exists; returns the URI."""
    uri = resolve_tracking_uri(settings, output_dir)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    if client.get_experiment_by_name(settings.experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            # Without an explicit location a database backend writes artifacts to ./mlruns of whatever cwd.
            artifact_location = (Path(output_dir).resolve() / "mlartifacts" / settings.experiment).as_uri()
        try:
            client.create_experiment(settings.experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException as exc:
            if "already exists" not in str(exc):  # another process created it first
                raise
    mlflow.set_experiment(settings.experiment)
    return uri


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted MLflow params, values cut to MLflow's size limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def unreachable_server() -> str | None:
    """The tracking server's URI when it does not answer now (None for a reachable one, or a local database)."""
    uri = current_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        check_reachable(uri)
    except TrackingError:
        return uri
    return None


def unfinished_run(folder: Path, key: str | None = None) -> str | None:
    """The run an earlier, unfinished attempt at `folder`'s work (the same `key`) left on this tracking backend
    (crashed, killed, or cut off from the server): its id, so that a re-run continues it instead of adding a run."""
    try:
        record = json.loads((folder / RUN_FILE).read_text())
        if record["tracking_uri"] != current_uri() or record.get("key") != key:
            return None
        run = MlflowClient().get_run(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError, mlflow.exceptions.MlflowException):
        return None
    return None if run.info.status == "FINISHED" else run.info.run_id


def finish_unfinished_run(folder: Path) -> None:
    """End the run of finished work whose run was left unfinished (its work completed while the server was away)."""
    run_id = unfinished_run(folder)
    if run_id is not None:
        MlflowClient().set_terminated(run_id, "FINISHED")


def _remember_run(folder: Path, run_id: str, key: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": current_uri(), "key": key}))
    tmp.replace(folder / RUN_FILE)


@contextlib.contextmanager
def start_run(
    name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None, run_id: str | None = None,
    folder: Path | None = None, key: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run tagged with provenance; nested runs sit under the active (pipeline) run.

    With `folder` (a stage's, or the recipe's run folder for the pipeline with the recipe's hash as `key`), the
    run's id is kept there and a later attempt at the same work continues an unfinished run: after a crash, a kill
    or a tracking server outage, MLflow holds one run per stage, not one per attempt. A run whose work fails while
    the server does not answer is left RUNNING (ending it would only wait out MLflow's retries again) for the
    re-run to continue."""
    all_tags = {**provenance_tags(), **(tags or {})}
    if folder is not None and run_id is None:
        run_id = unfinished_run(folder, key)
        if run_id is not None:
            log.info("continuing MLflow run %s (%s) left unfinished by an earlier attempt", run_id, name)
    run = mlflow.start_run(run_name=name, nested=nested, tags=all_tags, run_id=run_id)
    try:
        if folder is not None:
            _remember_run(folder, run.info.run_id, key)
        yield run
    except BaseException as exc:
        if unreachable_server() is None:
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        elif mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
            # MLflow has no call that forgets the active run without telling the server; its stack is the only
            # record of it in this process (a job run in-process again would otherwise find it still active).
            mlflow.tracking.fluent._active_run_stack.get().pop()
        raise
    mlflow.end_run()


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    flat = flatten(params, prefix)
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i: i + 100]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: Any, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


# ------------------------------------------------------------------------------------------ model registry
def register_folder(
    name: str, run_id: str, artifact_path: str, tags: Mapping[str, str] | None = None, description: str = ""
) -> str:
    """Register a run's artifact folder as a new version of `name`; returns the version number.

    MLflow 3's `register_model` expects a LoggedModel; a plain artifact folder is registered as a model version
    whose source is the run's artifact path.
    """
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=dict(tags or {}),
        description=description,
    )
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def version_by_alias(name: str, alias: str):
    """The ModelVersion an alias points to, or None when the alias is not set."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def download_model_version(model_uri: str, dst: str | Path | None = None) -> Path:
    """Files of a `models:/NAME@ALIAS` or `models:/NAME/VERSION` reference, downloaded locally."""
    dst = dst or tempfile.mkdtemp(prefix="draftsmith-model-")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def current_uri() -> str:
    return mlflow.get_tracking_uri()


def metric_history(run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, in step order."""
    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]
