"""Draft training on a real local Ray with 2 Ray Train workers and real DeepSpeed, on conversations the tiny
embedded base synthesized with vLLM (CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_OVERRIDES, SHORT_TRAINING, head_processes, job_running, kill_submitted_job, submit_job
from draftsmith import tracking
from draftsmith.export.manifest import read_manifest
from draftsmith.pipeline.runner import run_pipeline
from draftsmith.recipe.loader import load_recipe
from draftsmith.stages import pipeline_stages
from draftsmith.training.train_draft import ResumeError, latest_committed_checkpoint

pytestmark = pytest.mark.slow



def _train(root: Path, *overrides: str, until: str = "train"):
    recipe = load_recipe("tiny-eagle3", [*DATA_OVERRIDES, f"output_dir={root}", *SHORT_TRAINING, *overrides])
    tracking.configure(recipe.tracking, root)
    return run_pipeline(recipe, pipeline_stages(until))


def _history(run_id: str, key: str) -> list[float]:
    return tracking.metric_history(run_id, key)[1]


def test_eagle3_learns_and_only_the_draft_changes(flow):
    """The flow's bf16 EAGLE-3 training (80 steps, ZeRO-2, 2 workers, offline from the stored base features): it
    learns, logs, checkpoints, and only the draft's weights move. (Online training: Medusa and the EAGLE-1 drill.)"""
    _, results = flow
    train = results["train"]
    features = results["features"].outputs
    assert train.outputs.base_features == "offline"
    assert features.tokens > 0 and features.dtype == "bfloat16"
    assert features.bytes_per_token_bfloat16 <= features.bytes_per_token < 1.05 * features.bytes_per_token_bfloat16
    run_id = train.mlflow_run_id
    val_acc, val_loss = _history(run_id, "val/acc_step1"), _history(run_id, "val/loss")
    assert len(val_acc) == 3  # before training, at step 40, at the end
    assert val_acc[-1] >= val_acc[0] + 0.25, val_acc
    assert val_loss[-1] < 0.7 * val_loss[0], val_loss
    assert len(_history(run_id, "train/acc_step3")) == 16 and _history(run_id, "train/tokens_per_s")[-1] > 0
    artifacts = {a.path for a in tracking.MlflowClient().list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/loss.png", "plots/accuracy.png"}
    checkpoints = {a.path for a in tracking.MlflowClient().list_artifacts(run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/step-000040", "checkpoints/step-000080"}  # each one's draft, in MLflow

    summary = json.loads((train.directory / "training_summary.json").read_text())
    assert summary["steps"] == 80 and summary["base_unchanged"] and summary["resumed_from"] == []
    before = load_file(str(results["convert"].outputs.draft_dir / "draft.safetensors"))
    after = load_file(str(train.outputs.draft_dir / "draft.safetensors"))
    assert before.keys() == after.keys() and all(k.startswith("eagle_module.") for k in after)
    weights = [k for k in after if k.endswith("weight")]
    assert all(not torch.equal(before[k], after[k]) for k in weights)  # every draft weight trained
    assert torch.equal(before["eagle_module.d2t"], after["eagle_module.d2t"])  # the vocabulary mapping did not move
    assert before["eagle_module.d2t"].any()  # and it is a real mapping (256 of 865 tokens)


def test_dflash_trains_and_its_export_round_trips_in_vllm(training_root):
    """DFlash, the algorithm the seam was proven with: Ray Train + DeepSpeed train it, its export passes the
    DFlash tensor checks and runs in vLLM's CPU build (method dflash) with greedy output unchanged."""
    dflash = ["draft.algorithm=dflash", "quantization.format=none", "training.steps=30", "training.eval_every=30",
              "training.checkpoint_every=30", "export.verify_prompts=4"]
    results = _train(training_root, *dflash, until="export")
    run_id = results["train"].mlflow_run_id
    val_acc, val_loss = _history(run_id, "val/acc_step1"), _history(run_id, "val/loss")
    assert val_loss[-1] < val_loss[0] and val_acc[-1] > val_acc[0], (val_loss, val_acc)
    export = results["export"].outputs
    manifest = read_manifest(export.export_dir)
    assert manifest.algorithm == "dflash" and "DFlash" in manifest.engines_without_config["trtllm"]
    speculative = json.loads((export.export_dir / manifest.engine_configs["vllm"]).read_text())
    assert speculative["method"] == "dflash" and speculative["num_speculative_tokens"] == 3  # block of 4
    base_layers = json.loads((results["base"].outputs.model_dir / "config.json").read_text())["num_hidden_layers"]
    target_layers = manifest.draft.checks["vllm"]["aux_layer_ids"]
    assert len(target_layers) == 1 and target_layers[0] < base_layers - 1  # one per draft layer, never the last
    verification = export.verification
    assert verification.identical and verification.num_accepted_tokens > 0, verification


def _latest(stage_dirs) -> dict | None:
    """Progress record of the latest checkpoint Ray Train committed in this test's stage folder."""
    found = [c for d in stage_dirs() if (c := latest_committed_checkpoint(d)) is not None]
    return json.loads((found[0] / "progress.json").read_text()) if found else None


def _wait_for(condition, timeout_s: float, what: str, alive=lambda: True) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        assert alive(), f"the job ended before {what}"
        time.sleep(0.5)
    raise TimeoutError(what)


def test_killed_worker_and_killed_job_resume_without_losing_steps(training_root, head_node, tmp_path):
    """A Medusa draft under ZeRO-3 (partitioned optimizer and parameters: the hardest state to resume), trained
    by a job submitted with `ray job submit`, loses a worker, then the whole job is killed; the job submitted again
    finishes it: every step once, and it learned. Its heads, exported in vLLM's Medusa layout, run in vLLM (CPU) and
    get accepted. (EAGLE-3 trains in the flow, DFlash below; EAGLE-1's training step is test_draft_convert's.)"""
    drill = ["draft.algorithm=medusa", "training.zero_stage=3", "training.steps=40", "training.checkpoint_every=10",
             "training.eval_every=40", "training.max_failures=2", "training.keep_checkpoints=3", "training.seed=7"]
    overrides = [*DATA_OVERRIDES, f"output_dir={training_root}", *SHORT_TRAINING, *drill]
    args = ["--recipe", "tiny-eagle3", *[a for o in overrides for a in ("--set", o)]]
    earlier = set(training_root.glob("tiny-eagle3/train-*"))

    def stage_dirs() -> list[Path]:  # this test's train stage folder (other tests trained with other settings)
        return [d for d in training_root.glob("tiny-eagle3/train-*") if d not in earlier]

    # Nothing to resume yet: `--resume` (training.resume=require) refuses before any worker starts. (In this
    # process: that a refusal exits 2 with its one line is the CLI's, tested for every user error.)
    recipe = load_recipe("tiny-eagle3", [*overrides, "training.resume=require"])
    tracking.configure(recipe.tracking, training_root)
    with pytest.raises(ResumeError, match="nothing to resume"):
        run_pipeline(recipe, pipeline_stages("train"))

    started = time.time()
    job = f"training-drill-{time.time_ns()}"
    submitted = submit_job(head_node, "jobs.pipeline", *args, "--until", "train", wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    alive = lambda: job_running(head_node, job)  # noqa: E731
    try:
        _wait_for(lambda: _latest(stage_dirs), 600, "the first committed checkpoint", alive)
        workers = head_processes(head_node, "RayTrainWorker", since=started)
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()  # a worker dies mid-run: Ray Train restarts the group from the last checkpoint
        _wait_for(lambda: (_latest(stage_dirs) or {}).get("resumed_from"), 600,
                  "a checkpoint written after the restart", alive)
    finally:
        kill_submitted_job(head_node, "jobs.pipeline")  # then the whole job is killed
    _wait_for(lambda: not head_processes(head_node, "RayTrainWorker", since=started), 120,
              "the killed job's workers to go")
    last = _latest(stage_dirs)["step"]
    assert last < 40

    # Submitted again (insisting on a checkpoint to continue): it continues and ends as a job that succeeded.
    again = submit_job(head_node, "jobs.pipeline", *args, "--until", "train", "--set", "training.resume=require")
    assert again.returncode == 0 and "succeeded" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    (stage_dir,) = stage_dirs()
    summary = json.loads((stage_dir / "training_summary.json").read_text())
    # MLflow holds the stage's run once: the killed job's, continued by the second and finished.
    registry = tracking.MlflowClient(f"sqlite:///{training_root.resolve() / 'mlflow.db'}")
    runs = registry.search_runs(registry.get_experiment_by_name("draftsmith").experiment_id,
                                f"tags.`draftsmith.fingerprint` = '{stage_dir.name.removeprefix('train-')}'")
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert summary["steps"] == 40
    first_resume, second_resume = summary["resumed_from"]
    # The re-run continued from the latest committed checkpoint (the snapshot on disk may lag one report behind),
    # not from the start and not from the first resume point.
    assert first_resume < second_resume and last <= second_resume <= last + 10, (summary["resumed_from"], last)
    assert summary["base_unchanged"]
    # Learning survived both restarts: validation before step 1 (kept in the progress record) against the end.
    before, after = summary["initial_metrics"], summary["metrics"]
    assert after["val/loss"] < before["val/loss"] and after["val/acc_step1"] > before["val/acc_step1"] + 0.05, \
        (before, after)
    assert summary["algorithm"] == "medusa" and {"val/acc_step3", "train/acc_step3"} <= after.keys()  # 3 heads

    exported = _train(training_root, *drill, "quantization.format=none", "export.verify_prompts=4", until="export")
    assert exported["train"].directory == stage_dir  # the trained draft above, not a new training
    verification = exported["export"].outputs.verification
    assert verification.identical and verification.num_accepted_tokens > 0, verification
