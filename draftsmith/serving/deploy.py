"""Deploy a Serve config against a running cluster, with each app's model alias pinned to a version.

The same call moves a running endpoint to a new champion: the pinned version changes, so do the app's
arguments, and Serve rolls the engine replicas over (a replacement starts before the last old one stops, and
old replicas drain their requests).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.model_source import pin
from draftsmith.yaml_input import YamlInputError, load_yaml, read_yaml_file

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """The Serve config cannot be deployed; says which app and why."""


def load_serve_config(path: str | Path) -> dict[str, Any]:
    try:
        config = read_yaml_file(path)
    except YamlInputError as exc:
        raise DeployError(str(exc)) from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise DeployError(f"{path}: not a Serve config (no `applications` list)")
    return config


def _set(args: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        args = args.setdefault(key, {})
    args[leaf] = value


def render(config: dict[str, Any], overrides: list[str] | None = None, tracking_uri: str | None = None,
           recipe_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config with a recipe's `serving` section (`recipe_args`) and overrides (`KEY=VALUE`, YAML values)
    applied to every draftsmith app's args, in that order, the args validated, the registry address filled in and
    each model alias pinned to its current version."""
    config = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # a deep copy
    for app in config["applications"]:
        if app.get("import_path") != "serve.app:build_app":
            continue
        args = {**(app.get("args") or {}), **(recipe_args or {})}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise DeployError(f"override {item!r}: expected KEY=VALUE")
            try:
                _set(args, key.strip(), load_yaml(value, f"override {item!r}"))
            except YamlInputError as exc:
                raise DeployError(str(exc)) from None
        uri = args.get("tracking_uri") or tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            args["tracking_uri"] = uri
        try:
            settings = ServingSettings.model_validate(args)
        except ValueError as exc:
            raise DeployError(f"app {app.get('name')!r}: invalid args: {exc}") from None
        app["args"] = pin(settings).model_dump(mode="json", exclude_defaults=True)
    return config


def deployed_versions(details: dict[str, Any]) -> dict[str, str | None]:
    """{app: model_version} of what the cluster runs now."""
    versions = {}
    for name, app in (details.get("applications") or {}).items():
        args = ((app.get("deployed_app_config") or {}).get("args")) or {}
        versions[name] = args.get("model_version")
    return versions


def deploy(config: dict[str, Any], address: str, wait_s: float = 900.0) -> dict[str, Any]:
    """Submit to the cluster's dashboard (as `serve deploy` does) and wait until every app is RUNNING."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(address)
    before = deployed_versions(client.get_serve_details())
    client.deploy_applications(config)
    for app in config["applications"]:
        new = (app.get("args") or {}).get("model_version")
        if before.get(app["name"]) not in (None, new):
            log.info("app %s: rolling over from version %s to %s", app["name"], before[app["name"]], new)
    deadline = time.time() + wait_s
    names = [a["name"] for a in config["applications"]]
    while True:
        details = client.get_serve_details()
        apps = details.get("applications") or {}
        statuses = {n: (apps.get(n) or {}).get("status") for n in names}
        failed = {n: apps[n].get("message") for n, s in statuses.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise DeployError(f"deploy failed: {failed}")
        versions = deployed_versions(details)
        pinned = {a["name"]: (a.get("args") or {}).get("model_version") for a in config["applications"]}
        if all(s == "RUNNING" for s in statuses.values()) and all(versions.get(n) == v for n, v in pinned.items()):
            return details
        if time.time() > deadline:
            raise DeployError(f"apps not RUNNING after {wait_s:.0f} s: {statuses}")
        time.sleep(2)
