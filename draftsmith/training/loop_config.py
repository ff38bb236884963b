"""The draft trainer's loop settings, as the driver hands them to every Ray Train worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LoopConfig(BaseModel):
    """What `train_worker` needs. Ray Train passes a dict (`model_dump()`); the worker validates it back first, so a
    renamed or missing setting fails at the worker's start, not at the step that reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    init_checkpoint: str = Field(description="The draft checkpoint training starts from (absolute path).")
    base_dir: str = Field(description="The frozen base's folder (absolute path).")
    data_dir: str = Field(description="The tokenized dataset (absolute path).")
    features_dir: str | None = Field(description="The stored base features (offline training); None: online.")
    plan: list[list[list[str]]] = Field(description="Per rank: its micro batches, each a list of conversation keys.")
    validation_plan: list[list[list[str]]] = Field(description="Per rank: its validation micro batches.")
    pad_id: int
    num_accuracies: int = Field(description="Per-step accuracies the algorithm's objective reports.")
    deepspeed: dict[str, Any] = Field(description="The DeepSpeed config (`deepspeed_config`).")
    steps: int = Field(description="Optimizer steps in all (a resumed run continues to this).")
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    schedule: Literal["cosine", "linear", "constant"]
    min_lr_ratio: float
    grad_accumulation: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    seed: int
    loss_kernel: Literal["modelopt", "fused"] = Field(
        description="The EAGLE loss as resolved on the driver (`resolve_loss_kernel`): fused installs "
        "`draftsmith.draft.fused_loss` on the model before training.")
    tracking_uri: str | None = Field(description="MLflow, for rank 0 to log into `run_id`; None: no logging.")
    run_id: str | None
