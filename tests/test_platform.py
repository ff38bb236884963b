"""The deployment files in platform/ against the code they name: KubeRay's RayJob and RayService, the MLflow server,
the node image and the runtime env. No cluster: each file is read as YAML (or text) and every entry point, recipe,
Serve import path, flag, version and address it names is checked to exist and agree."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import ROOT
from draftsmith.commands import COMMANDS
from draftsmith.recipe.loader import load_recipe
from draftsmith.recipe.schema import ServingSettings

PLATFORM = ROOT / "platform"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pins(text: str) -> dict[str, str]:
    """`name==version` requirements in a text (a requirement list, a Dockerfile, a shell script)."""
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][\w.]*)",
                                                                   text)}


PROJECT_PINS = pins(" ".join(PYPROJECT["project"]["dependencies"]
                             + [r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra])
                    + (PLATFORM / "install.sh").read_text())


def containers(pod_specs: list[dict]) -> list[dict]:
    return [c for spec in pod_specs for c in spec["template"]["spec"]["containers"]]


def cluster_groups(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def mounts(group: dict) -> set[str]:
    return {m["mountPath"] for c in containers([group]) for m in c.get("volumeMounts", [])}


@pytest.mark.parametrize("path, kinds", [
    ("kuberay/rayjob.yaml", [("ray.io/v1", "RayJob")]),
    ("kuberay/rayservice.yaml", [("ray.io/v1", "RayService")]),
    ("mlflow/mlflow.yaml", [("apps/v1", "Deployment"), ("v1", "Service")]),
    ("mlflow/secret.example.yaml", [("v1", "Secret")]),
])
def test_manifests_are_yaml_of_their_kind(path, kinds):
    docs = documents(PLATFORM / path)
    assert [(d["apiVersion"], d["kind"]) for d in docs] == kinds
    assert all(d["metadata"]["namespace"] == "draftsmith" for d in docs)


def test_rayjob_runs_the_pipeline_of_a_recipe_through_the_cli(capsys):
    (job,) = documents(PLATFORM / "kuberay" / "rayjob.yaml")
    script, command, *args = shlex.split(job["spec"]["entrypoint"])
    assert script in PYPROJECT["project"]["scripts"] and COMMANDS[command] == "jobs.pipeline"
    from draftsmith.commands import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    known = capsys.readouterr().out
    assert all(flag in known for flag in args if flag.startswith("--")), args
    recipe = load_recipe(args[args.index("--recipe") + 1])  # a recipe of platform/recipes/ that validates

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == PROJECT_PINS["ray"]
    assert len({c["image"] for c in containers(cluster_groups(cluster))}) == 1
    # Every path the recipe reads or writes is on a volume every pod mounts.
    shared = set.intersection(*(mounts(g) for g in cluster_groups(cluster)))
    paths = [recipe.output_dir, recipe.base.model, *(str(s.path) for s in recipe.data.sources),
             *(str(s.path) for s in recipe.evaluation.prompt_sets if s.path)]
    assert all(any(p.startswith(m + "/") for m in shared) for p in paths), (paths, shared)

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}  # the code comes with the image, not an upload
    local = yaml.safe_load((PLATFORM / "runtime_env.yaml").read_text())["env_vars"]
    assert {k: v for k, v in local.items() if not k.startswith("VLLM_CPU_")}.items() <= runtime_env["env_vars"].items()


def test_the_recipes_mlflow_address_is_the_mlflow_service():
    recipe = load_recipe("llama3.1-8b-eagle3")
    deployment, service = documents(PLATFORM / "mlflow" / "mlflow.yaml")
    address = urlparse(recipe.tracking.uri)
    name, namespace, *_ = address.hostname.split(".")
    assert (name, namespace) == (service["metadata"]["name"], service["metadata"]["namespace"])
    (port,) = service["spec"]["ports"]
    assert address.port == port["port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in [p["name"] for p in server["ports"]]
    # MLflow refuses Host headers it was not told about: the one a client of that URI sends must match.
    allowed = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--allowed-hosts=")).split(",")
    assert any(fnmatch.fnmatch(address.netloc, pattern) for pattern in allowed), (address.netloc, allowed)


def test_mlflow_server_command_and_its_store_secret():
    import mlflow.cli

    deployment, _ = documents(PLATFORM / "mlflow" / "mlflow.yaml")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["mlflow"] and server["args"][0] == "server"
    options = {opt: p for p in mlflow.cli.server.params for opt in p.opts}
    flags = [a.split("=", 1)[0] for a in server["args"][1:]]
    assert all(flag in options for flag in flags), [f for f in flags if f not in options]
    assert "--serve-artifacts" in flags  # clients reach the object store through the server, without credentials
    (secret,) = documents(PLATFORM / "mlflow" / "secret.example.yaml")
    assert [e["secretRef"]["name"] for e in server["envFrom"]] == [secret["metadata"]["name"]]
    # The Secret names the database backend and the object store under the variables MLflow reads for them.
    for option in ("--backend-store-uri", "--artifacts-destination"):
        assert options[option].envvar in secret["stringData"], option
    assert secret["stringData"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert secret["stringData"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert server["image"].endswith(f":{PROJECT_PINS['mlflow']}")


def test_rayservice_serves_the_recipe_champion_with_the_serve_config():
    (service,) = documents(PLATFORM / "kuberay" / "rayservice.yaml")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    (local_app,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    assert app["import_path"] == local_app["import_path"]
    module, _, function = app["import_path"].partition(":")
    source = Path(importlib.util.find_spec(module).origin).read_text()
    assert function in {f.name for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}

    args = app["args"]
    ServingSettings.model_validate(args)  # what build_app does with them: unknown keys fail
    recipe = load_recipe("llama3.1-8b-eagle3")
    assert recipe.serving.model_dump(mode="json", exclude_defaults=True).items() <= args.items()
    assert args["model_ref"] == f"models:/{recipe.tracking.registry_name}@champion"
    assert args["tracking_uri"] == recipe.tracking.uri
    assert config["http_options"]["host"] == "0.0.0.0"  # reachable through the RayService's Kubernetes Service

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == PROJECT_PINS["ray"]
    gpus = sum(g["replicas"] * int(containers([g])[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"])
    assert gpus >= args["replicas"] * args["replica_gpus"]
    # The bearer key the ingress checks is in every pod's environment (from a Secret, never in the file).
    for container in containers(cluster_groups(cluster)):
        assert any(e["name"] == args["api_key_env"] and "secretKeyRef" in e["valueFrom"] for e in container["env"])


def test_the_node_image_pins_what_pyproject_and_install_sh_pin():
    dockerfile = (PLATFORM / "image" / "Dockerfile").read_text()
    image_pins = pins(dockerfile)
    assert image_pins and all(PROJECT_PINS.get(name) == version for name, version in image_pins.items()), image_pins
    assert {"torch", "nvidia-modelopt"} <= set(image_pins)
    ray_version, major, minor = re.search(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", dockerfile).groups()
    assert ray_version == PROJECT_PINS["ray"]
    assert f"PYTHON:-python{major}.{minor}" in (PLATFORM / "install.sh").read_text()  # install.sh's Python
    assert "'.[gpu]'" in dockerfile and "gpu" in PYPROJECT["project"]["optional-dependencies"]
    assert "--no-deps nvidia-modelopt" in dockerfile  # as install.sh: its setuptools pin fights vLLM's
    # Every package the project installs, and the recipes, are in the image.
    copied = set(re.findall(r"^COPY .* (\S+) \S+$", dockerfile, re.MULTILINE))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"platform"} <= copied
    mlflow_image = (PLATFORM / "mlflow" / "Dockerfile").read_text()
    assert pins(mlflow_image)["mlflow"] == PROJECT_PINS["mlflow"]


def test_the_image_leaves_out_what_a_job_upload_leaves_out():
    ignored = set((PLATFORM / "image" / "Dockerfile.dockerignore").read_text().split())
    assert set(yaml.safe_load((PLATFORM / "runtime_env.yaml").read_text())["excludes"]) <= ignored
