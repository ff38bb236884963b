"""Benchmark of draft training: tokens/s through Ray Train + DeepSpeed with 1 and 2 workers, against a plain
single-process PyTorch loop over the same ModelOpt model and the same micro batches, in one run."""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from draftsmith.bench.report import Section
from draftsmith.draft.checkpoint import load_draft, save_draft
from draftsmith.draft.convert import convert_base, load_base
from draftsmith.draft.algorithms import draft_forward
from draftsmith.embedded.conversations import generate_conversations
from draftsmith.jsonl import write_jsonl
from draftsmith.pipeline.artifacts import FeaturesArtifact
from draftsmith.recipe.schema import Recipe
from draftsmith.stages.convert import draft_meta
from draftsmith.base_model import model_fingerprint
from draftsmith.training.base_features import FeatureReader
from draftsmith.training.batching import collate, plan_micro_batches
from draftsmith.training.draft_data import prepare_training_data
from draftsmith.training.layout import read_split
from draftsmith.training.train_draft import train_draft

_BENCH_SEED = 4242  # conversations unlike the base's training set


def _plain_loop_tokens_per_s(init: Path, base_dir: Path, data_dir: Path, recipe: Recipe, steps: int,
                             warmup: int, features_dir: Path | None = None) -> float:
    """The same model and micro batches, one process, torch AdamW, no Ray and no DeepSpeed; with `features_dir`,
    offline from the stored base features (read from the store inside the timed loop, as the workers do)."""
    settings = recipe.training
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_draft(init, base_dir).model
    if settings.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  betas=settings.betas)
    rows = {r["source"]: r for r in read_split(data_dir, "train").to_pylist()}
    plan = plan_micro_batches(list(rows), [r["num_tokens"] for r in rows.values()],
                              micro_batch_size=settings.micro_batch_size, world_size=1, seed=settings.seed)[0]
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    reader = None if features_dir is None else FeatureReader(features_dir, "train", dtype)
    tokens, started = 0, time.perf_counter()
    for step, batch_ids in enumerate(itertools.islice(itertools.cycle(plan), warmup + steps)):
        if step == warmup:
            tokens, started = 0, time.perf_counter()
        batch = collate([rows[c] for c in batch_ids], pad_id)
        if reader is not None:
            batch["base_features"] = reader.batch(batch_ids, batch["input_ids"].shape[1])
        loss, _ = draft_forward(model, batch, recipe.draft.algorithm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


def training_section(model_dir: Path, recipe: Recipe, num_conversations: int = 1200, steps: int = 60) -> Section:
    """Steady-state tokens/s (real tokens, no padding) of the last `log_every` steps of each Ray run."""
    section = Section("Draft training: tokens/s (same model and data, one run)",
                      ["configuration", "steps", "wall s (with start-up)", "tokens/s", "ratio to plain loop"])
    with tempfile.TemporaryDirectory(prefix="draftsmith-bench-train-") as tmp:
        root = Path(tmp)
        corpus = recipe.base.embedded.corpus
        conversations = generate_conversations(num_conversations, _BENCH_SEED, tuple(corpus.families),
                                               corpus.recall_share)
        write_jsonl(root / "conversations.jsonl", (c.to_record() for c in conversations))
        vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        prepare_training_data([str(root / "conversations.jsonl")], model_dir, root / "data",
                              max_seq_len=recipe.training.max_seq_len, validation_share=0.05, max_bad_share=0.0,
                              vocab_size=vocab)
        draft = recipe.draft.model_copy(deep=True)
        draft.eagle.draft_vocab_size = None  # the vocabulary mapping does not change the cost
        model = convert_base(model_dir, draft)
        init = save_draft(model, root / "init", base_keys=set(load_base(model_dir).state_dict()),
                          meta=draft_meta(recipe, model_dir, model_fingerprint(model_dir)))
        runs = []
        for workers in (1, 2):
            settings = recipe.training.model_copy(deep=True)
            settings.num_workers, settings.steps = workers, steps
            settings.log_every, settings.eval_every, settings.checkpoint_every = 10, steps, steps
            started = time.perf_counter()
            summary = train_draft(init_checkpoint=init, base_dir=model_dir, data_dir=root / "data", settings=settings,
                                  out_dir=root / f"ray-{workers}", algorithm=draft.algorithm, run_id=None)
            runs.append((workers, time.perf_counter() - started, summary["metrics"]["train/tokens_per_s"]))
        started = time.perf_counter()
        plain = _plain_loop_tokens_per_s(init, model_dir, root / "data", recipe, steps=steps, warmup=5)
        plain_wall = time.perf_counter() - started
    for workers, wall, tps in runs:
        section.add(f"Ray Train + DeepSpeed ZeRO-{recipe.training.zero_stage}, {workers} worker"
                    f"{'s' if workers > 1 else ''}", steps, wall, tps, tps / plain)
    section.add("plain PyTorch loop, one process", steps, plain_wall, plain, 1.0)
    section.notes.append(
        f"{recipe.draft.algorithm} draft on the embedded base, {recipe.training.precision}, micro batch "
        f"{recipe.training.micro_batch_size} conversations per worker, {num_conversations} generated conversations; "
        "Ray rows: tokens/s of the last 10 steps, counted over all workers; the plain loop uses every core in one "
        "process. Wall time includes Ray Train start-up, data loading and the final checkpoint.")
    return section


def offline_training_section(init: Path, base_dir: Path, data_dir: Path, features: FeaturesArtifact, recipe: Recipe,
                             steps: int = 8) -> Section:
    """One process, the same model and micro batches: the base run in every step against its stored features."""
    section = Section(f"Draft training on the real base: online against offline base features ({recipe.name}, "
                      "one run)", ["base features", "steps", "tokens/s", "ratio to online"])
    online = _plain_loop_tokens_per_s(init, base_dir, data_dir, recipe, steps=steps, warmup=2)
    offline = _plain_loop_tokens_per_s(init, base_dir, data_dir, recipe, steps=steps, warmup=2,
                                       features_dir=features.features_dir)
    section.add("online: the base runs in each step", steps, online, 1.0)
    section.add(f"offline: read from the store ({features.dtype})", steps, offline, offline / online)
    section.notes.append(
        f"A plain loop (no Ray, no DeepSpeed), every core, {recipe.training.precision}, micro batch "
        f"{recipe.training.micro_batch_size} conversations, the same batches in both rows. The store took "
        f"{features.wall_seconds / 60:.1f} min to compute once ({features.tokens:,} tokens, "
        f"{features.bytes / 2**30:.2f} GiB): {features.bytes_per_token:,.0f} bytes per token, against "
        f"{features.bytes_per_token_bfloat16:,} in bfloat16 and {features.bytes_per_token_float32:,} in "
        "float32 for the same states.")
    return section
