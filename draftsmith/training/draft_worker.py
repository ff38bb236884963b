"""The Ray Train worker loop that trains a draft: DeepSpeed engine over the converted model, deterministic data
order, metrics from rank 0, checkpoints through `ray.train.report` (DeepSpeed state + the draft itself).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from draftsmith.draft.checkpoint import LoadedDraft, load_draft, write_checkpoint
from draftsmith.draft.algorithms import draft_forward
from draftsmith.draft.fused_loss import install_fused_loss
from draftsmith.training.base_features import FeatureReader, FeatureStoreError, check_store_fits, model_layout
from draftsmith.training.batching import collate, micro_batch_sequence
from draftsmith.training.distributed import lr_lambda, rank0_mlflow, prepare_worker
from draftsmith.training.layout import read_split
from draftsmith.training.loop_config import LoopConfig
from draftsmith.training.safe_resume import deepspeed_weights_only

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
DEEPSPEED_DIR = "deepspeed"
DRAFT_DIR = "draft"


def _own_rows(data_dir: str, split: str, wanted: set[str]) -> dict[str, dict]:
    """This worker's conversations, read by their `file:line` key (unique even when two datasets reuse
    conversation ids) from the split's files."""
    table = read_split(data_dir, split, ["source", "input_ids", "target_mask"], sources=wanted)
    rows = {source: {"input_ids": np.asarray(ids, dtype=np.int64), "target_mask": np.asarray(mask, dtype=np.int64)}
            for source, ids, mask in zip(table["source"].to_pylist(), table["input_ids"].to_pylist(),
                                         table["target_mask"].to_pylist(), strict=True)}
    missing = wanted - rows.keys()
    assert not missing, f"{len(missing)} planned conversations are missing from the {split} split"
    return rows


def _feature_readers(config: LoopConfig, model: torch.nn.Module, algorithm: str, rows: dict[str, dict[str, dict]]
                     ) -> dict[str, FeatureReader] | None:
    """Offline training: a reader per split over the stored base features, checked against the draft and the
    rows before the first step (None: online, the base runs in every step)."""
    if not config.features_dir:
        return None
    check_store_fits(config.features_dir, model_layout(model, algorithm))
    dtype = torch.bfloat16 if config.deepspeed.get("bf16", {}).get("enabled") else torch.float32
    readers = {split: FeatureReader(config.features_dir, split, dtype) for split in rows}
    for split, split_rows in rows.items():
        for source, row in split_rows.items():
            stored = readers[split].num_tokens(source)
            if stored != len(row["input_ids"]):
                raise FeatureStoreError(
                    f"{config.features_dir} holds {stored} tokens of features for {source}, which has "
                    f"{len(row['input_ids'])}; the store was computed from other data: re-run the features stage"
                )
    return readers


def _batch(sources: list[str], rows: dict[str, dict], pad_id: int, reader: FeatureReader | None
           ) -> dict[str, torch.Tensor]:
    batch = collate([rows[c] for c in sources], pad_id)
    if reader is not None:
        batch["base_features"] = reader.batch(sources, batch["input_ids"].shape[1])
    return batch


def _all_reduce_sums(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class _Window:
    """Sums of loss, per-step accuracy and tokens since the last log line, reduced over all workers."""

    def __init__(self, num_acc: int):
        self.num_acc = num_acc
        self.reset()

    def reset(self) -> None:
        self.batches, self.loss, self.tokens = 0, 0.0, 0
        self.acc = [0.0] * self.num_acc
        self.started = time.perf_counter()

    def add(self, loss: float, accs: list[float], tokens: int) -> None:
        self.batches += 1
        self.loss += loss
        self.tokens += tokens
        self.acc = [a + b for a, b in zip(self.acc, accs, strict=True)]

    def reduce(self, prefix: str) -> dict[str, float]:
        batches, loss, tokens, *acc = _all_reduce_sums([self.batches, self.loss, self.tokens, *self.acc])
        metrics = {f"{prefix}/loss": loss / max(1, batches)}
        metrics.update({f"{prefix}/acc_step{k + 1}": a / max(1, batches) for k, a in enumerate(acc)})
        metrics[f"{prefix}/tokens_per_s"] = tokens / max(1e-9, time.perf_counter() - self.started)
        return metrics


def _validate(engine, batches: list[dict], algorithm: str, num_acc: int) -> dict[str, float]:
    window = _Window(num_acc)
    with torch.no_grad():  # train mode on purpose: ModelOpt unrolls every TTT step only in training mode
        for batch in batches:
            loss, accs = draft_forward(engine, batch, algorithm)
            window.add(loss.item(), accs, int(batch["attention_mask"].sum()))
    metrics = window.reduce("val")
    metrics.pop("val/tokens_per_s")
    return metrics


def _base_checksum(model: torch.nn.Module, base_keys: set[str]) -> float:
    """A sum over this rank's share of the frozen base weights: it must not move during draft training."""
    total = 0.0
    for name, param in model.named_parameters():
        if name in base_keys:
            local = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps only this rank's partition
            total += float((local if local is not None else param.data).double().abs().sum())
    return total


def _draft_state(model: torch.nn.Module, base_keys: set[str]) -> dict[str, torch.Tensor]:
    """The draft's full fp32 weights (gathered under ZeRO-3: every rank must call this) and its buffers."""
    from deepspeed.utils import safe_get_full_fp32_param

    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name in base_keys:
            continue
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        tensors[name] = (full if full is not None else param.data).detach().float().cpu().clone()
    for name, value in model.state_dict().items():
        if name not in base_keys and name not in tensors:  # buffers: d2t, quantizer scales
            tensors[name] = (value.float() if value.is_floating_point() else value).detach().cpu().clone()
    return tensors


def _report_checkpoint(engine, loaded: LoadedDraft, progress: dict, metrics: dict, config: LoopConfig,
                       log_to_mlflow: bool) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the draft and the progress record; Ray merges them.

    The draft part (not the optimizer state) also goes to MLflow, so any checkpoint can be picked from the run.
    """
    import modelopt.torch.opt as mto

    step = progress["step"]
    tmp = Path(tempfile.mkdtemp(prefix=f"draft-step{step}-"))
    try:
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=f"step-{step}", exclude_frozen_parameters=True)
        tensors = _draft_state(engine.module, loaded.base_keys)
        if ray.train.get_context().get_world_rank() == 0:
            meta = loaded.meta.model_copy(update={"step": step, "trained_steps": loaded.meta.trained_steps + step,
                                                  "training_run_id": config.run_id})
            write_checkpoint(tmp / DRAFT_DIR, modelopt_state=mto.modelopt_state(engine.module), tensors=tensors,
                             meta=meta)
            (tmp / PROGRESS_FILE).write_text(json.dumps({**progress, "metrics": metrics}))
            if log_to_mlflow:
                import mlflow

                mlflow.log_artifacts(str(tmp / DRAFT_DIR), artifact_path=f"checkpoints/step-{step:06d}")
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_worker(loop_config: dict[str, Any]) -> None:
    # ModelOpt imports its vLLM plugin, and with it all of vLLM (about 4 s of a core), wherever vLLM is installed;
    # a training worker never runs vLLM, so the import fails fast here and ModelOpt skips the plugin.
    sys.modules.setdefault("vllm", None)
    import deepspeed

    config = LoopConfig.model_validate(loop_config)  # Ray Train hands over `LoopConfig.model_dump()`
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    prepare_worker(ctx.get_local_world_size())
    torch.manual_seed(config.seed + rank)
    loaded = load_draft(config.init_checkpoint, config.base_dir)
    model, algorithm = loaded.model, loaded.meta.algorithm
    if config.loss_kernel == "fused":
        install_fused_loss(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    total = config.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        warmup_steps=config.warmup_steps, total_steps=total, schedule=config.schedule,
        min_ratio=config.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config.deepspeed)
    progress: dict[str, Any] = {"step": 0, "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with deepspeed_weights_only():  # DeepSpeed itself would unpickle anything written there
                engine.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), load_module_strict=False)
            progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        progress.pop("metrics", None)
        progress["resumed_from"].append(progress["step"])
        log.info("rank %d resumed at step %d", rank, progress["step"])

    base_checksum = _base_checksum(engine.module, loaded.base_keys)
    plan, val_plan = config.plan[rank], config.validation_plan[rank]
    rows = _own_rows(config.data_dir, "train", {c for batch in plan for c in batch})
    val_rows = _own_rows(config.data_dir, "validation", {c for batch in val_plan for c in batch})
    readers = _feature_readers(config, engine.module, algorithm, {"train": rows, "validation": val_rows})
    device = engine.device

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def make_batch(sources: list[str], split: str, split_rows: dict[str, dict]) -> dict[str, torch.Tensor]:
        return to_device(_batch(sources, split_rows, config.pad_id, readers and readers[split]))

    val_batches = [make_batch(batch, "validation", val_rows) for batch in val_plan]
    accumulation = config.grad_accumulation
    sequence = micro_batch_sequence(len(plan), start=progress["step"] * accumulation, seed=config.seed, rank=rank)
    num_acc = config.num_accuracies
    window = _Window(num_acc)
    last: dict[str, float] = {}

    with rank0_mlflow(config.tracking_uri, config.run_id) as logs:
        import mlflow

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            if logs:
                mlflow.log_metrics(metrics, step=step)

        if progress["step"] == 0:  # kept in the progress record: a resumed run reports where it started from
            progress["initial_metrics"] = _validate(engine, val_batches, algorithm, num_acc)
            log_metrics(progress["initial_metrics"], 0)
        if progress["resumed_from"]:
            log_metrics({"train/resumed_from_step": progress["step"]}, progress["step"])
        while progress["step"] < total:
            for _ in range(accumulation):
                batch = make_batch(plan[next(sequence)], "train", rows)
                loss, accs = draft_forward(engine, batch, algorithm)
                engine.backward(loss)
                engine.step()
                window.add(loss.item(), accs, int(batch["attention_mask"].sum()))
            progress["step"] += 1
            step = progress["step"]
            if step % config.log_every == 0 or step == total:
                last = window.reduce("train")
                last["train/lr"] = scheduler.get_last_lr()[0]
                log_metrics(last, step)
                if rank == 0:
                    log.info("step %d/%d loss %.4f acc %s", step, total, last["train/loss"],
                             [round(last[f"train/acc_step{k + 1}"], 3) for k in range(num_acc)])
                window.reset()
            if step % config.eval_every == 0 or step == total:
                val = _validate(engine, val_batches, algorithm, num_acc)
                log_metrics(val, step)
                last.update(val)
            if step == total:
                # The base is frozen by construction; prove it before the result is trusted downstream.
                if _base_checksum(engine.module, loaded.base_keys) != base_checksum:
                    raise RuntimeError("the base model's weights changed during draft training")
                progress["base_unchanged"] = True
            if step % config.checkpoint_every == 0 or step == total:
                _report_checkpoint(engine, loaded, progress, last, config, logs)
            if window.batches == 0:  # validation and checkpoints do not count against training throughput
                window.started = time.perf_counter()
