"""The `draftsmith` command: help for every subcommand, status of a finished run, the end-of-run summary, chat
against an OpenAI-compatible endpoint, ui, and progress output when nobody watches a terminal. No Ray, no training:
finished runs are written as the stages' own done markers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, free_port
from draftsmith import progress
from draftsmith.commands import COMMANDS, main, summary_sentence
from draftsmith.pipeline.artifacts import (Artifact, BaseArtifact, ConvertArtifact, DatasetArtifact,
                                           EvaluationArtifact, ExportArtifact, GateOutcome, PromptsArtifact,
                                           PromptSource, QatArtifact, QuantizationInfo, QuantizeArtifact,
                                           RegistrationArtifact, RoundTrip, SynthesisArtifact, TrainArtifact)
from draftsmith.pipeline.stage import StageResult
from openai_test_server import OpenAITestServer

HEAVY = ("torch", "ray", "vllm", "transformers", "mlflow", "deepspeed")


@pytest.fixture(autouse=True)
def own_environment(monkeypatch):
    """Every command runs `progress.configure`, which writes to the environment (pytest's output is no terminal):
    keep that inside the test. Without the MLflow URIs earlier tests left there, as a user's shell would be."""
    monkeypatch.setattr(os, "environ", clean_env())
    monkeypatch.setattr(progress, "_set_here", {})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


# ------------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_explains_itself_with_an_example(capsys, name):
    code, out, _ = run(capsys, name, "--help")
    assert code == 0
    assert out.startswith(f"usage: draftsmith {name} ")
    assert " ".join(summary_sentence(COMMANDS[name]).split()[:6]) in " ".join(out.split())
    assert f"\n    draftsmith {name} " in out  # an example, as the user types it


def test_console_script_lists_every_command_and_help_imports_nothing_heavy():
    script = Path(sys.executable).parent / "draftsmith"  # what `make setup` installs from [project.scripts]
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert all(f"\n  {name} " in result.stdout for name in COMMANDS), result.stdout
    # Every subcommand's --help in one fresh interpreter: none may import the heavy stack (seconds each).
    probe = ("import sys\nfrom draftsmith.commands import COMMANDS, main\nfor name in COMMANDS:\n"
             "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
             f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = run(capsys, "trian", "--recipe", "tiny-eagle3")
    assert code == 2 and "unknown command 'trian'" in err and "train" in err


# ---------------------------------------------------------------------------------------- a finished run
def finished_artifacts(root: Path) -> dict[str, Artifact]:
    """A whole run of tiny-eagle3 as its stages would hand it on (figures like the README's)."""
    report = root / "evaluate" / "evaluation.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"rows": [
        {"set": "embedded-heldout", "temperature": 0.0, "draft": {"speedup_vs_base": 1.1034}},
        {"set": "embedded-mtbench", "temperature": 0.0, "draft": {"acceptance_length": 3.44}}]}))
    trip = RoundTrip(prompts=8, identical=True, mismatched_prompts=[], output_tokens=224, acceptance_length=3.412,
                     num_drafts=60, num_accepted_tokens=140, accepted_per_position=[55, 50, 35],
                     tokens_per_s={"base": 700.0, "with_draft": 750.0}, samples=[])
    return {
        "base": BaseArtifact(model_dir=root / "base", model_hash="2ffc1f6fb5f415d7", embedded=True),
        "prompts": PromptsArtifact(sources=[PromptSource(path=root / "p.jsonl", format="openai")],
                                   heldout=root / "heldout.jsonl", generated=True),
        "synthesize": SynthesisArtifact(conversations=[root / "s.jsonl"], output_dir=root, written=2454,
                                        quarantined=3, read=3000),
        "dataset": DatasetArtifact(data_dir=root, files=1, conversations=2454, usable=2454, quarantined=0,
                                   bad_share=0.0, train=2335, validation=119, truncated=0, tokens=167828,
                                   target_tokens=90000, distinct_target_tokens=246),
        "convert": ConvertArtifact(draft_dir=root, algorithm="eagle3", draft_parameters=328192,
                                   base_parameters=1070000, draft_vocab_size=256, base_vocab_size=865),
        "train": TrainArtifact(draft_dir=root, steps=800, resumed_from=[], base_features="online",
                               metrics={"val/acc_step1": 0.9012, "val/acc_step2": 0.92, "val/loss": 0.88}),
        "quantize": QuantizeArtifact(draft_dir=root, quantized_base_dir=None, quantization=QuantizationInfo(
            format="fp8", kv_cache=True, base=False, calibration_samples=64)),
        "qat": QatArtifact(draft_dir=root, steps=200, report=None),
        "export": ExportArtifact(export_dir=root / "export", algorithm="eagle3", variants={"vllm": "draft-vllm"},
                                 engine_configs={"vllm": "vllm/speculative_config.json"}, verification=trip),
        "evaluate": EvaluationArtifact(report=report, markdown=report.with_suffix(".md"), greedy_identical=True,
                                       acceptance_length={"embedded-heldout@t=0": 3.4812,
                                                          "embedded-mtbench@t=0": 3.4399}),
        "register": RegistrationArtifact(name="tiny-eagle3-draft", version="3", reused=False, alias="champion",
                                         model_uri="models:/tiny-eagle3-draft/3", gate=GateOutcome(
                                             promoted=True, reason="acceptance 3.48 beats champion v2's 3.30",
                                             champion_version="2")),
    }


def write_finished_run(recipe, root: Path) -> dict[str, Path]:
    """Done markers for every stage the recipe uses, where the pipeline would look for them, written by the stages'
    own `write_done`; returns each stage's folder."""
    from draftsmith.pipeline.runner import stage_dir
    from draftsmith.stages import pipeline_stages

    artifacts, upstream, folders = finished_artifacts(root), {}, {}
    for stage in pipeline_stages():
        if not stage.enabled(recipe):
            continue
        fingerprint = stage.fingerprint(recipe, upstream)
        folders[stage.name] = stage_dir(recipe, stage, fingerprint)
        folders[stage.name].mkdir(parents=True)
        stage.write_done(folders[stage.name], fingerprint, artifacts[stage.name], f"run-{stage.name}")
        upstream[stage.name] = StageResult(stage.name, fingerprint, folders[stage.name], artifacts[stage.name])
    return folders


def test_status_of_a_finished_run(capsys, tmp_path):
    from draftsmith.recipe.loader import load_recipe

    out_dir = tmp_path / "runs"
    recipe = load_recipe("tiny-eagle3", [f"output_dir={out_dir}"])
    folders = write_finished_run(recipe, tmp_path / "outputs")
    stale = out_dir / "tiny-eagle3" / "train-0123456789ab"  # a training of other settings, finished earlier
    stale.mkdir()
    (stale / "_DONE.json").write_text((folders["train"] / "_DONE.json").read_text())

    code, out, _ = run(capsys, "status", "--recipe", "tiny-eagle3", "--set", f"output_dir={out_dir}")
    assert code == 0
    assert "features    not used by this recipe" in out
    assert "train       done " in out and f"{folders['train']} (1 finished folder(s) of other settings)" in out
    assert "800 steps (online), validation accuracy 0.90 / 0.92" in out
    assert "acceptance length embedded-heldout@t=0 3.48, embedded-mtbench@t=0 3.44" in out
    assert "tiny-eagle3-draft v3 -> champion; gate: promoted: acceptance 3.48 beats champion v2's 3.30" in out
    assert "11 of 11 stages done\n" in out
    assert f"registry tiny-eagle3-draft: no MLflow database at sqlite:///{out_dir.resolve()}/mlflow.db yet" in out

    (folders["register"] / "_DONE.json").unlink()
    unreachable = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run(capsys, "status", "--recipe", "tiny-eagle3", "--set", f"output_dir={out_dir}",
                       "--set", f"tracking.uri={unreachable}")
    assert "register    not run for these settings" in out
    assert (f"10 of 11 stages done; `draftsmith pipeline --recipe tiny-eagle3 --set output_dir={out_dir} "
            f"--set tracking.uri={unreachable}` runs the rest") in out
    assert ("registry tiny-eagle3-draft: MLflow unreachable, versions not shown (MLflow tracking server "
            f"{unreachable} is unreachable") in out


def test_status_lists_registry_versions_and_aliases(tmp_path):
    from mlflow import MlflowClient

    from draftsmith.commands.status import registry_status
    from draftsmith.recipe.loader import load_recipe

    recipe = load_recipe("tiny-eagle3", [f"output_dir={tmp_path}"])
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-eagle3-draft")
    for _ in range(2):
        client.create_model_version("tiny-eagle3-draft", source=str(tmp_path))
    client.set_registered_model_alias("tiny-eagle3-draft", "champion", "1")
    client.set_registered_model_alias("tiny-eagle3-draft", "challenger", "2")
    lines = registry_status(recipe).splitlines()
    assert lines[0] == f"registry tiny-eagle3-draft at {uri} (2 versions):"
    assert lines[1].split()[:2] == ["v2", "challenger"] and lines[2].split()[:2] == ["v1", "champion"]


# -------------------------------------------------------------------------------------------- the summary
def results_of(artifacts: dict[str, Artifact], ran: set[str]) -> dict[str, StageResult]:
    return {name: StageResult(name, f"fp{name}", Path(f"runs/tiny-eagle3/{name}-fp"), artifact,
                              skipped=name not in ran, mlflow_run_id=f"run-{name}")
            for name, artifact in artifacts.items()}


def test_summary_figures_are_the_artifacts(tmp_path):
    from draftsmith.pipeline.summary import run_summary

    artifacts = finished_artifacts(tmp_path)
    results = results_of(artifacts, ran={"evaluate", "register"})
    text = run_summary(["--recipe", "tiny-eagle3"], Path("runs/tiny-eagle3"), results, "sqlite:///x/mlflow.db",
                       "draftsmith", Path("runs/tiny-eagle3/pipeline.json"))
    lines = text.splitlines()
    assert lines[0] == ("draftsmith pipeline tiny-eagle3: 11 stages done (2 ran now: evaluate, register; "
                        "9 found done)")
    built = next(line for line in lines if line.startswith("built"))
    assert "eagle3 draft, trained 800 steps, validation accuracy 0.90 / 0.92, fp8 + 200 QAT steps" in built
    assert f"{tmp_path / 'export'} (round trip on 8 prompts: greedy identical, acceptance 3.41)" in text
    registration = artifacts["register"]
    assert f"registered  {registration.model_uri} -> alias champion" in text
    assert f"gate: promoted: {registration.gate.reason}" in text
    # acceptance per set from the artifact; the speedup where the report measured one (the heldout set only)
    assert "  embedded-heldout@t=0   3.48   1.10x" in lines
    assert "  embedded-mtbench@t=0   3.44" in lines
    assert "mlflow      sqlite:///x/mlflow.db, experiment draftsmith, run run-register (stage register)" in lines
    assert "pipeline.json" in text and "draftsmith deploy --recipe tiny-eagle3" in text
    assert "draftsmith ui --recipe tiny-eagle3" in text and "draftsmith chat" in text
    assert "--promote" not in text  # already champion

    refused = registration.model_copy(update={"alias": "challenger", "gate": GateOutcome(
        promoted=False, reason="acceptance 3.10 is not above champion v2's 3.30 + 0.05", champion_version="2")})
    artifacts["evaluate"].report.unlink()  # a report moved away: acceptance still shows, without speedups
    text = run_summary(["--recipe", "tiny-eagle3"], Path("runs/tiny-eagle3"),
                       results_of({**artifacts, "register": refused}, set()), "http://mlflow:5000", "draftsmith")
    assert "-> alias challenger" in text and "gate: not promoted: acceptance 3.10 is not above" in text
    assert "draftsmith register --recipe tiny-eagle3 --promote 3 --alias champion" in text
    assert "  embedded-heldout@t=0   3.48" in text.splitlines() and "speedup" not in text


def test_summary_of_a_partial_run_says_how_to_continue(tmp_path):
    from draftsmith.pipeline.summary import run_summary

    artifacts = finished_artifacts(tmp_path)
    partial = {name: artifacts[name] for name in ("base", "prompts")}
    args = ["--recipe", "tiny-eagle3", "--set", "output_dir=/data/my runs"]  # the next commands repeat them
    text = run_summary(args, Path("/data/my runs/tiny-eagle3"), results_of(partial, {"prompts"}), "u", "e")
    assert "2 stages done (1 ran now: prompts; 1 found done)" in text
    assert "prompts  1 prompt file(s), held-out prompts, generated" in text  # each stage's key figures
    assert "draftsmith pipeline --recipe tiny-eagle3 --set 'output_dir=/data/my runs'" in text
    assert "draftsmith deploy" not in text and "\n\n\n" not in text

    text = run_summary(args, Path("/data/my runs/tiny-eagle3"), results_of(artifacts, set()), "sqlite:////d/m.db", "e")
    assert "draftsmith ui --recipe tiny-eagle3 --set 'output_dir=/data/my runs'" in text
    # deploy's --set is the Serve app's: the recipe's registry is named instead
    assert "draftsmith deploy --recipe tiny-eagle3 --tracking-uri sqlite:////d/m.db" in text


def test_every_artifact_has_key_figures():
    from draftsmith.pipeline import artifacts
    from draftsmith.pipeline.summary import FIGURES

    kinds = {kind for kind in vars(artifacts).values()
             if isinstance(kind, type) and issubclass(kind, Artifact) and kind is not Artifact}
    assert kinds == set(FIGURES), "a new artifact type needs a line in draftsmith/pipeline/summary.py FIGURES"


def test_pipeline_job_prints_the_summary_and_keeps_the_json(capsys, monkeypatch, tmp_path):
    import draftsmith.stages.run as stage_run

    results = results_of(finished_artifacts(tmp_path / "outputs"), ran=set())
    monkeypatch.setattr(stage_run, "run_recipe", lambda recipe, until=None: results)
    args = ["pipeline", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path}"]
    code, out, _ = run(capsys, *args)
    record = json.loads((tmp_path / "tiny-eagle3" / "pipeline.json").read_text())
    assert code == 0 and out.startswith("draftsmith pipeline tiny-eagle3: 11 stages done")
    assert record == stage_run.summary(results) and f"{tmp_path / 'tiny-eagle3' / 'pipeline.json'}" in out
    code, out, _ = run(capsys, *args, "--json")
    assert code == 0 and json.loads(out) == record


# ------------------------------------------------------------------------------------------------- chat
def test_chat_streams_one_answer_and_holds_a_conversation(tmp_path):
    from draftsmith.commands import chat

    server = OpenAITestServer(None, reply=lambda messages: f"answer {len(messages)}: c-a-t spells cat.",
                              model_id="tiny-eagle3-draft")
    try:
        out = io.StringIO()
        assert chat.main(["Spell", "cat.", "--url", server.url], out=out) == 0
        assert out.getvalue() == "answer 1: c-a-t spells cat.\n"
        sent = server.requests[-1]
        assert sent["stream"] is True and sent["model"] == "tiny-eagle3-draft"
        assert sent["messages"] == [{"role": "user", "content": "Spell cat."}]

        out = io.StringIO()
        assert chat.main(["--url", server.url, "--system", "Be brief."], out=out,
                         inp=io.StringIO("hello\nand again\n\n")) == 0
        assert out.getvalue() == "answer 2: c-a-t spells cat.\nanswer 4: c-a-t spells cat.\n"
        assert [m["role"] for m in server.requests[-1]["messages"]] == ["system", "user", "assistant", "user"]
    finally:
        server.close()


def test_chat_says_what_is_wrong_with_the_endpoint(capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    code, _, err = run(capsys, "chat", "hi", "--url", dead)
    assert code == 2 and f"no endpoint answers at {dead}" in err and "Traceback" not in err

    server = OpenAITestServer(None, api_key="sesame", reply=lambda messages: "ok")
    try:
        code, _, err = run(capsys, "chat", "hi", "--url", server.url)
        assert code == 2 and "HTTP 401" in err
        monkeypatch.setenv("DRAFTSMITH_API_KEY", "sesame")
        code, out, _ = run(capsys, "chat", "hi", "--url", server.url)
        assert code == 0 and out == "ok\n"
    finally:
        server.close()


# --------------------------------------------------------------------------------------------------- ui
def test_ui_starts_mlflow_on_the_recipe_store(capsys, tmp_path):
    args = ["ui", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path}", "--dry-run"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "no MLflow database at" in err and "draftsmith pipeline --recipe tiny-eagle3" in err
    (tmp_path / "mlflow.db").touch()
    code, out, _ = run(capsys, *args, "--port", "5001")
    assert code == 0
    assert f"-m mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db --host 127.0.0.1 " \
           "--port 5001" in out
    code, out, _ = run(capsys, *args, "--set", "tracking.uri=http://mlflow.draftsmith.svc:5000")
    assert code == 0 and "tracks to the MLflow server at http://mlflow.draftsmith.svc:5000" in out


# ------------------------------------------------------------------------------------------ progress output
def test_a_log_gets_progress_lines_and_a_terminal_keeps_its_bars(monkeypatch):
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    assert progress.configure() == {} and "TQDM_MININTERVAL" not in os.environ

    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    os.environ["RAY_TQDM"] = "1"  # what a user or a `ray job submit` runtime env set is kept, and not handed on
    applied = progress.configure()
    assert applied == {"TQDM_MININTERVAL": str(progress.LOG_INTERVAL_S),
                       "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": str(progress.LOG_INTERVAL_S)}
    assert os.environ["RAY_TQDM"] == "1" and progress.worker_env() == applied


def test_ray_workers_get_the_progress_setting(monkeypatch):
    from draftsmith import cluster
    from draftsmith.recipe.schema import RaySettings

    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    progress.configure()
    started = {}
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: started.update(kwargs))
    cluster.connect(RaySettings())
    env = started["runtime_env"]["env_vars"]
    assert env["RAY_TQDM"] == "0" and env["TQDM_MININTERVAL"] == str(progress.LOG_INTERVAL_S)


def test_a_bar_in_a_log_redraws_once_per_interval():
    """A 2-second bar of 40 updates, written to a pipe: every redraw without the setting, two with it."""
    bar = ("from draftsmith import progress\nimport sys\nif sys.argv[1] == 'log': progress.configure()\n"
           "import time\nfrom tqdm import tqdm\nfor _ in tqdm(range(40)): time.sleep(0.05)\n")
    redraws = {}
    for mode in ("default", "log"):
        result = subprocess.run([sys.executable, "-c", bar, mode], capture_output=True, text=True, timeout=60,
                                cwd=ROOT, env=clean_env())
        assert result.returncode == 0, result.stderr
        redraws[mode] = result.stderr.count("it/s]")
    assert redraws["default"] >= 10 and redraws["log"] <= 3, redraws


def test_local_workers_drop_only_the_unanswerable_state_api_warning(monkeypatch):
    """Draftsmith's local Ray (no dashboard, so no State API) runs `quiet_local_workers` in each worker: Ray Train's
    once-a-second warning that the State API cannot answer is dropped there, and nothing else is."""
    import logging

    import ray

    from draftsmith import cluster
    from draftsmith.cluster import LOCAL_TRAIN_ENV
    from draftsmith.recipe.schema import RaySettings

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    kept, saved = Kept(), list(logger.filters)
    logger.addHandler(kept)
    try:
        progress.quiet_local_workers()
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily "
                       "unavailable. Continuing to monitor.")
        logger.warning("Failed to remove placement group")
    finally:
        logger.removeHandler(kept)
        logger.filters[:] = saved
    assert kept.messages == ["Failed to remove placement group"]

    # ... and the local cluster hands the hook to its workers by its import path (a worker imports it there).
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in LOCAL_TRAIN_ENV:  # connect sets them for the cluster it starts; put back after the test
        monkeypatch.setenv(key, "0")
    cluster.connect(RaySettings(num_cpus=8))
    module, _, function = seen["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    assert getattr(__import__(module, fromlist=[function]), function) is progress.quiet_local_workers


def test_serve_leaves_out_the_acceptance_of_an_endpoint_whose_metrics_do_not_answer():
    """The answer is in by then: a /metrics that cannot be read leaves the figure out, not a traceback."""
    from draftsmith.commands.serve import acceptance_length

    assert acceptance_length(f"http://127.0.0.1:{free_port()}", timeout_s=5) is None
