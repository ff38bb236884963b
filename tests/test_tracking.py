"""MLflow through the tracking module, against a real `mlflow server` on loopback and a local sqlite store."""

from __future__ import annotations

import os
import signal
import subprocess

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from draftsmith import tracking
from draftsmith.recipe.schema import TrackingSettings


def test_runs_params_metrics_artifacts_and_nesting(mlflow_server, tmp_path):
    settings = TrackingSettings(uri=mlflow_server, experiment="test-tracking")
    assert tracking.configure(settings, tmp_path) == mlflow_server
    (tmp_path / "report.json").write_text('{"ok": true}')
    with tracking.start_run("parent", tags={"draftsmith.recipe_hash": "abc"}) as parent:
        with tracking.start_run("child", nested=True) as child:
            tracking.log_params({"training": {"lr": 0.1, "steps": 3}})
            for step in range(3):
                tracking.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            tracking.log_artifact(tmp_path / "report.json", artifact_path="reports")
    client = MlflowClient(mlflow_server)
    run = client.get_run(child.info.run_id)
    assert run.data.params == {"training.lr": "0.1", "training.steps": "3"}
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "draftsmith.git_commit" in run.data.tags
    assert "draftsmith.version.torch" in run.data.tags
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(child.info.run_id, "reports")] == ["reports/report.json"]
    assert client.get_run(parent.info.run_id).data.tags["draftsmith.recipe_hash"] == "abc"


def test_registry_versions_aliases_and_download(mlflow_server, tmp_path):
    tracking.configure(TrackingSettings(uri=mlflow_server, experiment="test-registry"), tmp_path)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    versions = []
    for _ in range(2):
        with tracking.start_run("export") as run:
            tracking.log_artifact(folder, artifact_path="draft")
        versions.append(tracking.register_folder("test-draft", run.info.run_id, "draft",
                                                 tags={"draftsmith.algorithm": "eagle3"}))
    assert versions[1] == str(int(versions[0]) + 1)
    tracking.set_alias("test-draft", "champion", versions[0])
    tracking.set_alias("test-draft", "challenger", versions[1])
    champion = tracking.version_by_alias("test-draft", "champion")
    assert champion.version == versions[0]
    assert champion.tags["draftsmith.algorithm"] == "eagle3"
    assert tracking.version_by_alias("test-draft", "nobody") is None
    local = tracking.download_model_version("models:/test-draft@challenger", tmp_path / "dl")
    assert (local / "config.json").read_text() == (folder / "config.json").read_text()


def test_default_is_local_sqlite_with_artifacts_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure(TrackingSettings(experiment="local"), tmp_path)
    try:
        assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
        with tracking.start_run("r") as run:
            tracking.log_dict({"a": 1}, "x.json")
        assert (tmp_path / "mlartifacts" / "local").is_dir()
        assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri("")


def test_unreachable_server_fails_fast_with_a_fix(tmp_path):
    from conftest import free_port

    with pytest.raises(tracking.TrackingError, match="unreachable.*mlflow server"):
        tracking.configure(TrackingSettings(uri=f"http://127.0.0.1:{free_port()}"), tmp_path)


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
    server.wait(timeout=60)


@pytest.mark.slow
def test_server_stopped_during_a_stage_fails_in_one_line_and_the_rerun_continues_its_runs(tiny_base, tmp_path,
                                                                                         monkeypatch):
    """Issue 18's drill: the MLflow server goes away while a stage runs and stays away past MLflow's retries. The
    job exits 2 with one line naming the stage and the fix; with the server started again, the same command
    completes, and MLflow holds each run once (the interrupted ones continued, not doubled), all finished."""
    from conftest import TINY_BASE_OVERRIDES, free_port, mlflow_server_process, run_job_here, wait_http
    from draftsmith.stages.prompts import PromptsStage

    store, port = tmp_path / "mlflow", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    args = ["--recipe", "tiny-eagle3", "--until", "prompts", "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", f"tracking.uri={uri}", *[a for o in TINY_BASE_OVERRIDES for a in ("--set", o)]]
    # MLflow's client retries a failed call for about 4 minutes by default; here one retry, so the outage outlasts it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    server = mlflow_server_process(store, port)
    try:
        wait_http(f"{uri}/health", 120, server)
        run_prompts = PromptsStage.run

        def run_during_an_outage(self, ctx, out_dir):
            _stop(server)
            return run_prompts(self, ctx, out_dir)

        monkeypatch.setattr(PromptsStage, "run", run_during_an_outage)
        failed = run_job_here("jobs.pipeline", *args)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
        (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: stage prompts: the MLflow tracking server {uri} stopped answering; start "
                               "it again and re-run the same command"), line

        monkeypatch.setattr(PromptsStage, "run", run_prompts)
        server = mlflow_server_process(store, port)
        wait_http(f"{uri}/health", 120, server)
        again = run_job_here("jobs.pipeline", *args)
        assert again.returncode == 0, again.stderr[-3000:]
        client = MlflowClient(uri)
        runs = client.search_runs(client.get_experiment_by_name("draftsmith").experiment_id)
        assert sorted((r.info.run_name, r.info.status) for r in runs) == [
            ("base", "FINISHED"), ("pipeline:tiny-eagle3", "FINISHED"), ("prompts", "FINISHED")], runs
        prompts_run = next(r for r in runs if r.info.run_name == "prompts")
        assert prompts_run.data.metrics["prompts"] > 0  # logged by the attempt that finished
    finally:
        if server.poll() is None:
            _stop(server)
