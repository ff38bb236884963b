"""Ray Train + DeepSpeed plumbing shared by every trainer: the DeepSpeed config, the TorchTrainer, rank-0 logging."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

log = logging.getLogger(__name__)


def deepspeed_config(
    *, zero_stage: int, precision: str, micro_batch_size: int, grad_accumulation: int, grad_clip: float,
    world_size: int,
) -> dict[str, Any]:
    """DeepSpeed settings from the recipe. The optimizer and scheduler are torch objects handed to
    `deepspeed.initialize`, so DeepSpeed does not JIT-compile its fused Adam on CPU."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "train_batch_size": micro_batch_size * grad_accumulation * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,  # progress goes to MLflow and the log, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if zero_stage == 3:
        # Small models: gather whole parameters rather than chunking them below DeepSpeed's thresholds.
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9})
    return config


def lr_lambda(*, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.0
              ) -> Callable[[int], float]:
    """Linear warmup then cosine, linear or constant decay to `min_ratio` of the peak lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def prepare_worker(num_workers_on_node: int) -> None:
    """What every DeepSpeed training worker sets before `deepspeed.initialize`.

    The node's cores are split between its workers: oversubscribed BLAS threads slow every worker down. And
    DeepSpeed's shared-memory all-reduce op is marked unavailable: on CPU its communication backend JIT-compiles
    that op when it starts (about 40 s of two compilers on a fresh machine, once per machine) for the all-reduce
    of tensor-parallel inference, which training never calls; ZeRO's collectives go through torch.distributed."""
    import deepspeed.ops

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, num_workers_on_node)))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_torch_trainer(
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage_path: str | Path,
    num_workers: int,
    use_gpu: bool = False,
    max_failures: int = 0,
    keep_checkpoints: int | None = None,
) -> ray.train.Result:
    """Run `loop` on `num_workers` Ray Train workers (gloo on CPU, NCCL on GPUs) and return the result.

    A run with the same name and storage as an interrupted one continues from its latest committed checkpoint.
    """
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {name} failed: {result.error}") from result.error
    return result


@contextlib.contextmanager
def rank0_mlflow(tracking_uri: str | None, run_id: str | None) -> Iterator[bool]:
    """On rank 0, re-open the stage's MLflow run inside the worker; yields whether this rank logs.

    Metrics are logged from the worker because Ray Train's `Result.metrics` is not reliable without a
    checkpoint (Ray 2.60), and a live curve is what people watch.
    """
    is_rank0 = ray.train.get_context().get_world_rank() == 0
    if not (is_rank0 and tracking_uri and run_id):
        yield False
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        yield True
