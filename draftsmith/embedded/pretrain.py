"""Pretrain the embedded base: a small Llama trained on packed conversations with Ray Train + DeepSpeed."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.recipe.schema import EmbeddedArchitecture, EmbeddedPretraining
from draftsmith.training.distributed import (
    deepspeed_config,
    lr_lambda,
    rank0_mlflow,
    run_torch_trainer,
    prepare_worker,
)

log = logging.getLogger(__name__)

ROW_KEYS = ("input_ids", "labels", "position_ids")
ROWS_FILE = "ray_train/packed_rows.npz"


def llama_config(arch: EmbeddedArchitecture, tokenizer) -> LlamaConfig:
    heads = arch.hidden_size // arch.head_dim
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=arch.num_key_value_heads or heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def _pretrain_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: DeepSpeed engine over the packed rows, metrics to MLflow from rank 0."""
    import deepspeed

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    prepare_worker(ctx.get_local_world_size())
    torch.manual_seed(config["seed"])
    model = LlamaForCausalLM(LlamaConfig.from_dict(config["model_config"]))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=config["weight_decay"]
    )
    total_steps = config["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps=config["warmup_steps"], total_steps=total_steps, min_ratio=0.05)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config["deepspeed"]
    )
    # This worker's rows (the driver shuffled them once), in a fresh seeded order each epoch: the same batches on
    # every run of the same settings.
    with np.load(config["rows_file"], allow_pickle=False) as packed:
        shard = {k: torch.from_numpy(packed[k][ctx.get_world_rank()::world]) for k in ROW_KEYS}
    micro = config["micro_batch_size"]
    step, epoch, tokens, started = 0, 0, 0, time.perf_counter()
    losses: list[float] = []
    with rank0_mlflow(config["tracking_uri"], config["run_id"]) as logs:
        import mlflow

        while step < total_steps:
            order = torch.from_numpy(np.random.default_rng([config["seed"], epoch, ctx.get_world_rank()]).permutation(
                len(shard["input_ids"])))
            batches = ({k: v[order[i:i + micro]] for k, v in shard.items()}
                       for i in range(0, len(order) - micro + 1, micro))
            for batch in batches:
                out = engine(
                    input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
                )
                engine.backward(out.loss)
                engine.step()
                step += 1
                tokens += int(batch["input_ids"].numel()) * world
                losses.append(out.loss.item())
                if logs and (step % config["log_every"] == 0 or step == total_steps):
                    elapsed = time.perf_counter() - started
                    mlflow.log_metrics(
                        {"pretrain/loss": float(np.mean(losses[-config["log_every"]:])),
                         "pretrain/lr": scheduler.get_last_lr()[0], "pretrain/tokens_per_s": tokens / elapsed},
                        step=step,
                    )
                    log.info("pretrain step %d/%d loss %.4f", step, total_steps, losses[-1])
                if step >= total_steps:
                    break
            epoch += 1
    if config["deepspeed"]["zero_optimization"]["stage"] == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank must take part in the gather
    else:
        state = engine.module.state_dict()
    metrics = {"steps": step, "final_loss": float(np.mean(losses[-20:])), "tokens": tokens,
               "seconds": time.perf_counter() - started}
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def pretrain_base(
    rows: dict[str, np.ndarray],
    model_config: LlamaConfig,
    settings: EmbeddedPretraining,
    out_dir: Path,
    *,
    tracking_uri: str | None,
    run_id: str | None,
) -> dict[str, float]:
    """Train on packed `rows` and write the weights (safetensors) and config into `out_dir`."""
    world = settings.num_workers
    rows_per_worker = len(rows["input_ids"]) // world
    steps_per_epoch = rows_per_worker // settings.micro_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(rows['input_ids'])} packed rows cannot fill one step of {world} workers x "
            f"{settings.micro_batch_size} rows; generate more conversations or lower micro_batch_size"
        )
    total_steps = max(1, int(steps_per_epoch * settings.epochs))
    order = np.random.default_rng(settings.seed).permutation(len(rows["input_ids"]))
    # The rows go to the workers as a file in the build folder (the run's storage), not through Ray Data: a few MB
    # that every worker reads once, where a Ray Data pass per epoch cost tens of seconds of task start-up.
    rows_file = out_dir / ROWS_FILE
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(rows_file, **{k: np.asarray(rows[k])[order] for k in ROW_KEYS})
    loop_config = {
        "model_config": model_config.to_dict(),
        "deepspeed": deepspeed_config(zero_stage=settings.zero_stage, precision="fp32",
                                      micro_batch_size=settings.micro_batch_size, grad_accumulation=1,
                                      grad_clip=settings.grad_clip, world_size=world),
        "lr": settings.lr, "weight_decay": settings.weight_decay, "warmup_steps": settings.warmup_steps,
        "total_steps": total_steps, "micro_batch_size": settings.micro_batch_size, "seed": settings.seed,
        "log_every": max(1, min(25, total_steps // 10)), "tracking_uri": tracking_uri, "run_id": run_id,
        "rows_file": str(rows_file.resolve()),
    }
    log.info("pretraining the embedded base: %d steps on %d workers", total_steps, world)
    result = run_torch_trainer(
        _pretrain_worker, loop_config, name=f"pretrain-{out_dir.name}", storage_path=out_dir / "ray_train",
        num_workers=world,
    )
    result.checkpoint.to_directory(str(out_dir))
    rows_file.unlink()
    return dict(result.metrics or {})
