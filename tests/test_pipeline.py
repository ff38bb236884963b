"""The pipeline skeleton: stages skip when done and re-run when settings or inputs change; bad input fails fast."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from conftest import TINY_BASE_OVERRIDES, free_port, run_job, run_job_here
from draftsmith import tracking
from draftsmith.pipeline.artifacts import Artifact, ExportArtifact, RoundTrip, RoundTripSample, TrainArtifact
from draftsmith.pipeline.runner import run_pipeline
from draftsmith.pipeline.stage import DONE_MARKER, Stage
from draftsmith.recipe.loader import load_recipe
from draftsmith.stages import ExportStage, TrainStage


class FileArtifact(Artifact):
    file: Path


class CountingStage(Stage):
    """A toy stage that records each real run; its settings are `training.steps`."""

    artifact = FileArtifact

    def __init__(self, name, depends_on=()):
        self.name, self.depends_on, self.runs = name, depends_on, 0

    def settings(self, recipe):
        return {"steps": recipe.training.steps}

    def run(self, ctx, out_dir: Path):
        self.runs += 1
        (out_dir / "out.txt").write_text(str(ctx.recipe.training.steps))
        return FileArtifact(file=out_dir / "out.txt")


@pytest.fixture
def recipe_in(tmp_path):
    def make(*overrides):
        recipe = load_recipe("tiny-eagle3", [f"output_dir={tmp_path}", *overrides])
        tracking.configure(recipe.tracking, recipe.output_dir)
        return recipe
    return make


def test_finished_stage_is_skipped_and_changed_settings_rerun(recipe_in):
    first, second = CountingStage("first"), CountingStage("second", depends_on=("first",))
    results = run_pipeline(recipe_in(), [first, second])
    assert (first.runs, second.runs) == (1, 1)
    assert (results["first"].directory / DONE_MARKER).is_file()

    results = run_pipeline(recipe_in(), [first, second])
    assert (first.runs, second.runs) == (1, 1)
    assert results["first"].skipped and results["second"].skipped

    changed = run_pipeline(recipe_in("training.steps=7"), [first, second])
    assert (first.runs, second.runs) == (2, 2)  # the downstream stage follows its input's new fingerprint
    assert changed["first"].directory != results["first"].directory
    assert changed["first"].outputs.file.read_text() == "7"


class OptionalStage(CountingStage):
    """A stage the recipe uses only with `training.base_features=offline` (as the features stage)."""

    def enabled(self, recipe):
        return recipe.training.base_features == "offline"


def test_a_stage_the_recipe_does_not_use_is_passed_over(recipe_in):
    """An unused stage neither runs nor changes its consumer's fingerprint; used, it is an input like any other."""
    optional, consumer = OptionalStage("optional"), CountingStage("consumer")
    consumer.optional_inputs = ("optional",)
    without = run_pipeline(recipe_in(), [optional, consumer])
    assert optional.runs == 0 and "optional" not in without
    plain = CountingStage("consumer")
    assert without["consumer"].fingerprint == plain.fingerprint(recipe_in(), {})

    used = run_pipeline(recipe_in("training.base_features=offline"), [optional, consumer])
    assert (optional.runs, consumer.runs) == (1, 2)
    assert used["consumer"].fingerprint != without["consumer"].fingerprint


def test_interrupted_stage_without_marker_runs_again(recipe_in):
    stage = CountingStage("only")
    result = run_pipeline(recipe_in(), [stage])["only"]
    (result.directory / DONE_MARKER).unlink()  # as if killed before finishing
    run_pipeline(recipe_in(), [stage])
    assert stage.runs == 2


def test_artifact_round_trips_through_the_done_marker(tmp_path):
    """What a stage's `write_done` stores reads back as the same type, equal, with its MLflow run."""
    trained = TrainArtifact(draft_dir=tmp_path / "draft", steps=80, resumed_from=[40],
                            metrics={"val/loss": 1.25, "val/acc_step1": 0.5}, base_features="offline")
    stage = TrainStage()
    stage.write_done(tmp_path, "f00d", trained, "run-1")
    record = json.loads((tmp_path / DONE_MARKER).read_text())
    assert record["artifact"] == "TrainArtifact" and record["outputs"]["draft_dir"] == str(tmp_path / "draft")
    done = stage.read_done(tmp_path)
    assert type(done.artifact) is TrainArtifact and done.artifact == trained and done.mlflow_run_id == "run-1"
    # Nested records too: the export's round trip reads back typed, and one written before it was typed
    # ({"skipped": true} for "not run") reads as None rather than failing the marker.
    trip = RoundTrip(prompts=1, identical=True, mismatched_prompts=[], output_tokens=8, acceptance_length=2.5,
                     num_drafts=3, num_accepted_tokens=5, accepted_per_position=[3, 2, 0],
                     tokens_per_s={"base": 10.0, "with_draft": 12.0},
                     samples=[RoundTripSample(messages=[{"role": "user", "content": "hi"}], text="hello")])
    export = ExportArtifact(export_dir=tmp_path / "export", algorithm="eagle3", variants={"vllm": "draft-vllm"},
                            engine_configs={"vllm": "vllm/speculative_config.json"}, verification=trip)
    stage = ExportStage()
    stage.write_done(tmp_path, "f00d", export, None)
    assert stage.read_done(tmp_path).artifact.verification.samples[0].text == "hello"
    record = json.loads((tmp_path / DONE_MARKER).read_text())
    record["outputs"]["verification"] = {"skipped": True}
    (tmp_path / DONE_MARKER).write_text(json.dumps(record))
    assert stage.read_done(tmp_path).artifact.verification is None


def test_done_marker_of_an_older_layout_is_run_again(recipe_in, caplog):
    """A `_DONE.json` from before typed artifacts (outputs by key, no artifact type) is read only when its outputs
    are exactly the artifact's fields; otherwise it is never read as done: the stage runs again, saying why, and
    its new marker then reads back."""
    stage = CountingStage("only")
    result = run_pipeline(recipe_in(), [stage])["only"]
    marker = result.directory / DONE_MARKER
    record = json.loads(marker.read_text())
    del record["artifact"]
    marker.write_text(json.dumps(record))
    kept = run_pipeline(recipe_in(), [stage])["only"]  # the same keys: the finished work is kept
    assert kept.skipped and stage.runs == 1 and kept.outputs == result.outputs
    record["outputs"] = {"file_name": record["outputs"]["file"]}  # a key this version does not have
    marker.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="draftsmith.pipeline.runner"):
        again = run_pipeline(recipe_in(), [stage])["only"]
    assert stage.runs == 2 and not again.skipped and again.directory == result.directory
    assert (f"stage only: the finished run in {result.directory} was written by another version of draftsmith "
            "(missing field file and 1 more); running it again") in caplog.text
    assert run_pipeline(recipe_in(), [stage])["only"].skipped and stage.runs == 2

    # Typed, but with a field this version does not have (a renamed key): also run again, naming the field.
    record = json.loads(marker.read_text())
    record["outputs"] = {"path": record["outputs"]["file"]}
    marker.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="draftsmith.pipeline.runner"):
        run_pipeline(recipe_in(), [stage])
    assert stage.runs == 3 and "(missing field file and 1 more)" in caplog.text
    # Another artifact type recorded: run again too.
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "artifact": "TrainArtifact"}))
    run_pipeline(recipe_in(), [stage])
    assert stage.runs == 4


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"):])


@pytest.mark.slow
def test_pipeline_job_runs_then_skips(tiny_base, mlflow_server, tmp_path):
    args = ["--recipe", "tiny-eagle3", "--until", "prompts", "--json", "--set", f"output_dir={tmp_path}",
            "--set", f"tracking.uri={mlflow_server}"]
    for override in TINY_BASE_OVERRIDES:
        args += ["--set", override]
    first = run_job("jobs.pipeline", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = _summary(first.stdout)
    assert summary["base"]["outputs"]["model_dir"] == str(tiny_base)
    assert not summary["prompts"]["skipped"]
    assert json.loads((tmp_path / "tiny-eagle3" / "pipeline.json").read_text()) == summary  # the file --json prints
    prompts = Path(summary["prompts"]["outputs"]["sources"][0]["path"]).read_text().splitlines()
    assert len(prompts) == 40 and "messages" in json.loads(prompts[0])

    # The re-runs in this process (the first run above is the fresh interpreter a user starts).
    again = run_job_here("jobs.pipeline", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(stage["skipped"] for stage in _summary(again.stdout).values())
    readable = run_job_here("jobs.pipeline", *[a for a in args if a != "--json"])  # the summary a person reads
    assert readable.returncode == 0 and "2 stages done (0 ran now; 2 found done)" in readable.stdout, readable.stdout
    assert "draftsmith pipeline --recipe tiny-eagle3" in readable.stdout and "{" not in readable.stdout

    more = run_job_here("jobs.pipeline", *args, "--set", "data.num_prompts=41")
    stages = _summary(more.stdout)
    assert stages["base"]["skipped"] and not stages["prompts"]["skipped"]


def _fails_clearly(result, pattern: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(pattern, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_base_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = run_job_here("jobs.pipeline", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path}",
                     "--set", f"base.model={tmp_path}", "--set", f"data.sources=[{{path: {tmp_path}/p.jsonl}}]",
                     "--set", f"evaluation.prompt_sets=[{{name: s, path: {tmp_path}/p.jsonl}}]",
                     "--set", "evaluation.gate_set=s")
    _fails_clearly(result, r"not a usable causal LM folder.*BertModel")


def test_unreachable_mlflow(tmp_path):
    result = run_job_here("jobs.pipeline", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path}",
                     "--set", f"tracking.uri=http://127.0.0.1:{free_port()}")
    _fails_clearly(result, r"MLflow tracking server .* is unreachable")


def test_unreachable_ray(tmp_path):
    result = run_job_here("jobs.pipeline", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path}",
                     "--set", f"ray.address=127.0.0.1:{free_port()}")
    _fails_clearly(result, r"no Ray cluster answers at 127\.0\.0\.1:\d+.*ray start --head")


def test_malformed_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntraining:\n  stepz: 3\n")
    _fails_clearly(run_job_here("jobs.pipeline", "--recipe", str(bad)), r"bad.yaml:3: unknown key 'training.stepz'")
    _fails_clearly(run_job_here("jobs.pipeline", "--recipe", "nope"), r"recipe 'nope' not found")
