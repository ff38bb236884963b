"""Train (or QAT-finetune) a draft: plan the data, run the Ray Train + DeepSpeed workers, collect the result.

The same function continues from a converted, a trained or a quantized checkpoint: it restores whatever ModelOpt
modes the checkpoint holds, so the QAT finetune is this training again from the quantized checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from transformers import AutoTokenizer

from draftsmith import tracking
from draftsmith.draft.algorithms import get_algorithm
from draftsmith.draft.checkpoint import DraftMeta, check_compatible
from draftsmith.draft.fused_loss import resolve_loss_kernel
from draftsmith.plots import line_plot
from draftsmith.recipe.schema import TrainingSettings
from draftsmith.training.base_features import read_manifest
from draftsmith.training.batching import plan_micro_batches
from draftsmith.training.distributed import deepspeed_config, run_torch_trainer
from draftsmith.training.draft_data import DraftDataError
from draftsmith.training.draft_worker import DRAFT_DIR, PROGRESS_FILE, train_worker
from draftsmith.training.layout import read_split
from draftsmith.training.loop_config import LoopConfig

log = logging.getLogger(__name__)

RAY_TRAIN_DIR = "ray_train"
RUN_NAME = "train"
SUMMARY_FILE = "training_summary.json"
Resume = Literal["auto", "require", "never"]


class ResumeError(ValueError):
    """`--resume` was asked for but there is no checkpoint to resume from."""


def latest_committed_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint Ray Train continues from when this stage runs again: its latest committed one.

    A folder on disk is not enough: a worker or job killed while reporting leaves an uploaded but uncommitted one.
    """
    snapshot = Path(out_dir, RAY_TRAIN_DIR, RUN_NAME, "checkpoint_manager_snapshot.json")
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # being rewritten by a running trainer
        return None
    folder = snapshot.parent / latest["checkpoint_dir_name"] if latest else None
    return folder if folder is not None and (folder / PROGRESS_FILE).is_file() else None


def num_accuracies(meta: DraftMeta) -> int:
    return get_algorithm(meta.algorithm).num_accuracies(meta)


def _plan(data_dir: Path, split: str, settings: TrainingSettings, *, shuffle: bool) -> list[list[list[str]]]:
    table = read_split(data_dir, split, ["source", "num_tokens"]).to_pandas()
    world = settings.num_workers
    micro = settings.micro_batch_size if shuffle else max(1, min(settings.micro_batch_size, len(table) // world))
    plan = plan_micro_batches(table["source"].tolist(), table["num_tokens"].tolist(),
                              micro_batch_size=micro, world_size=world, seed=settings.seed, shuffle=shuffle)
    if not plan[0]:
        raise DraftDataError(
            f"{len(table)} {split} conversations cannot give each of {world} workers one micro batch of {micro}; "
            "synthesize more conversations, or lower training.num_workers or training.micro_batch_size"
        )
    if not shuffle:
        plan = [batches[: settings.validation_batches] for batches in plan]
    return plan


def _plots(run_id: str, out_dir: Path, accuracies: int) -> list[Path]:
    """Loss and per-step accuracy curves (train and validation), from the metrics the workers logged."""
    def series(keys: dict[str, str]) -> dict:
        return {label: tracking.metric_history(run_id, key) for label, key in keys.items()}

    loss = line_plot(series({"train": "train/loss", "validation": "val/loss"}), "Draft loss", "step", "loss",
                     out_dir / "plots" / "loss.png")
    acc_keys = {f"val step {k}": f"val/acc_step{k}" for k in range(1, accuracies + 1)}
    acc_keys.update({f"train step {k}": f"train/acc_step{k}" for k in range(1, accuracies + 1)})
    acc = line_plot(series(acc_keys), "Draft top-1 accuracy per step", "step", "accuracy",
                    out_dir / "plots" / "accuracy.png")
    return [loss, acc]


def train_draft(*, init_checkpoint: Path, base_dir: Path, data_dir: Path, settings: TrainingSettings, out_dir: Path,
                algorithm: str, run_id: str | None, steps: int | None = None, lr: float | None = None,
                resume: Resume = "auto", features_dir: Path | None = None) -> dict[str, Any]:
    """Train from `init_checkpoint` into OUT/draft; returns the summary (also written to OUT/training_summary.json).

    With `features_dir` (the features stage's store) the draft trains offline: the workers read the base's
    stored states instead of running the base. Everything that can be checked on the driver is checked before a
    worker starts: the checkpoint's algorithm and base, the data's size against the workers and micro batch, the
    feature store's manifest.
    """
    meta = check_compatible(init_checkpoint, algorithm=algorithm, base_dir=base_dir)
    if features_dir is not None:
        read_manifest(features_dir)
    loss_kernel = resolve_loss_kernel(settings.loss_kernel, meta.algorithm)  # fails here if ModelOpt's loss changed
    steps = steps or settings.steps
    plan = _plan(data_dir, "train", settings, shuffle=True)
    validation_plan = _plan(data_dir, "validation", settings, shuffle=False)
    if resume == "never":
        shutil.rmtree(out_dir / RAY_TRAIN_DIR, ignore_errors=True)
    # Ray Train continues a run of the same name and storage from its latest committed checkpoint by itself.
    previous = latest_committed_checkpoint(out_dir)
    if resume == "require" and previous is None:
        raise ResumeError(f"nothing to resume: no committed checkpoint under {out_dir / RAY_TRAIN_DIR}")
    if previous is not None:
        log.info("resuming from %s", previous)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loop = LoopConfig(
        init_checkpoint=str(Path(init_checkpoint).resolve()), base_dir=str(Path(base_dir).resolve()),
        data_dir=str(Path(data_dir).resolve()),
        features_dir=str(Path(features_dir).resolve()) if features_dir is not None else None,
        plan=plan, validation_plan=validation_plan, pad_id=pad_id,
        num_accuracies=num_accuracies(meta),
        deepspeed=deepspeed_config(zero_stage=settings.zero_stage, precision=settings.precision,
                                   micro_batch_size=settings.micro_batch_size,
                                   grad_accumulation=settings.grad_accumulation, grad_clip=settings.grad_clip,
                                   world_size=settings.num_workers),
        steps=steps, lr=lr or settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
        warmup_steps=min(settings.warmup_steps, steps // 2), schedule=settings.schedule,
        min_lr_ratio=settings.min_lr_ratio, grad_accumulation=settings.grad_accumulation,
        log_every=settings.log_every, eval_every=settings.eval_every,
        checkpoint_every=settings.checkpoint_every, seed=settings.seed, loss_kernel=loss_kernel,
        tracking_uri=tracking.current_uri() if run_id else None, run_id=run_id,
    )
    batches_per_epoch = len(plan[0]) // settings.grad_accumulation
    log.info("training a %s draft: %d steps on %d workers (%d steps per epoch; the base's features %s; %s loss)",
             meta.algorithm, steps, settings.num_workers, batches_per_epoch,
             "online" if features_dir is None else f"from {features_dir}", loss_kernel)
    result = run_torch_trainer(
        train_worker, loop.model_dump(), name=RUN_NAME, storage_path=out_dir / RAY_TRAIN_DIR,
        num_workers=settings.num_workers, use_gpu=settings.use_gpu,
        max_failures=settings.max_failures, keep_checkpoints=settings.keep_checkpoints,
    )
    with result.checkpoint.as_directory() as directory:
        final = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        shutil.rmtree(out_dir / DRAFT_DIR, ignore_errors=True)
        shutil.copytree(Path(directory) / DRAFT_DIR, out_dir / DRAFT_DIR)
    summary = {"steps": final["step"], "resumed_from": final["resumed_from"], "metrics": final["metrics"],
               "initial_metrics": final.get("initial_metrics", {}),
               "base_unchanged": final.get("base_unchanged", False),
               "epochs": steps / max(1, batches_per_epoch), "algorithm": meta.algorithm,
               "base_features": "online" if features_dir is None else "offline", "loss_kernel": loss_kernel,
               "draft": str(out_dir / DRAFT_DIR), "checkpoint": result.checkpoint.path}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if run_id:
        for plot in _plots(run_id, out_dir, num_accuracies(meta)):
            tracking.log_artifact(plot, artifact_path="plots")
        tracking.log_artifact(out_dir / DRAFT_DIR, artifact_path="draft")
        tracking.log_dict(summary, SUMMARY_FILE)
    return summary
