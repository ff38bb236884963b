"""Build the embedded default base on first use (corpus, tokenizer, pretraining, evaluation), cached by settings hash."""

from __future__ import annotations

import json
import math
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from draftsmith import tracking
from draftsmith.cluster import cache_dir, cache_lock
from draftsmith.embedded.conversations import Conversation, train_and_heldout
from draftsmith.embedded.exact_match import exact_match_report, greedy_answers, turn_prompts
from draftsmith.embedded.packing import pack_conversations
from draftsmith.embedded.pretrain import llama_config, pretrain_base
from draftsmith.embedded.tokenizer import conversation_texts, save_tokenizer, train_tokenizer
from draftsmith.jsonl import read_jsonl, write_jsonl
from draftsmith.monitoring import PeakMemory
from draftsmith.pipeline.stage import read_marker, write_marker
from draftsmith.plots import bar_plot, line_plot
from draftsmith.recipe.loader import settings_hash
from draftsmith.recipe.schema import EmbeddedBase

log = logging.getLogger(__name__)

# Bump when the builder's code changes what it produces, so stale cached bases are not reused.
BUILDER_VERSION = 2

HELDOUT_FILE = "corpus/heldout.jsonl"
TRAIN_FILE = "corpus/train.jsonl"
REPORT_FILE = "build_report.json"


def embedded_base_dir(settings: EmbeddedBase) -> Path:
    key = settings_hash({"settings": settings.model_dump(mode="json"), "builder": BUILDER_VERSION})
    return cache_dir() / "base" / f"embedded-{key}"


def is_built(settings: EmbeddedBase) -> bool:
    return read_marker(embedded_base_dir(settings)) is not None


def evaluate_exact_match(model_dir: Path, heldout: list[Conversation], max_new_tokens: int = 96) -> dict:
    """Greedy answers of the model in `model_dir` on the held-out turns, judged against the references."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = turn_prompts(heldout)
    return exact_match_report(prompts, greedy_answers(model, tokenizer, prompts, max_new_tokens))


def build_embedded_base(settings: EmbeddedBase, *, tracking_uri: str | None = None) -> Path:
    """The cached base folder for `settings`, built now if missing. Needs a Ray connection to pretrain."""
    out = embedded_base_dir(settings)
    with cache_lock(out):
        if read_marker(out) is not None:
            log.info("embedded base cached at %s", out)
            return out
        if out.exists():  # a crashed earlier attempt: the build is minutes, restart it cleanly
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tracking.start_run("build-embedded-base", nested=tracking.active_run_id() is not None,
                                tags={"draftsmith.stage": "embedded-base", "draftsmith.base_dir": str(out)}) as run:
            report = _build_into(out, settings, tracking_uri, run.info.run_id)
            tracking.log_artifact(out / REPORT_FILE)
            for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
                tracking.log_artifact(out / name, artifact_path="model")
        write_marker(out, {"stage": "embedded-base", "mlflow_run_id": run.info.run_id,
                           "outputs": {"model_dir": str(out)}, "report": report})
    return out


def _build_into(out: Path, settings: EmbeddedBase, tracking_uri: str | None, run_id: str) -> dict:
    started = time.perf_counter()
    corpus = settings.corpus
    tracking.log_params(settings.model_dump(mode="json"))
    with PeakMemory() as memory:
        train, heldout = train_and_heldout(corpus.num_train, corpus.num_heldout, corpus.seed,
                                           tuple(corpus.families), corpus.recall_share)
        write_jsonl(out / TRAIN_FILE, (c.to_record() for c in train))
        write_jsonl(out / HELDOUT_FILE, (c.to_record() for c in heldout))

        tokenizer = train_tokenizer(conversation_texts(c.messages() for c in train),
                                    settings.architecture.vocab_size)
        save_tokenizer(tokenizer, out)
        rows = pack_conversations(tokenizer, (c.messages() for c in train), settings.pretraining.seq_len)
        model_config = llama_config(settings.architecture, tokenizer)
        log.info("corpus: %d conversations, %d packed rows of %d tokens, vocabulary %d",
                 len(train), len(rows["input_ids"]), settings.pretraining.seq_len, len(tokenizer))

        train_metrics = pretrain_base(rows, model_config, settings.pretraining, out,
                                      tracking_uri=tracking_uri, run_id=run_id)
        shutil.rmtree(out / "ray_train", ignore_errors=True)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(out)
        train_seconds = time.perf_counter() - started
        quality = evaluate_exact_match(out, heldout)
    report = {
        "build_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "peak_memory_bytes": memory.peak_bytes,
        "vocab_size": len(tokenizer),
        "num_parameters": _count_parameters(out),
        "packed_rows": int(len(rows["input_ids"])),
        "train_metrics": train_metrics,
        **quality,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    _plot(out, run_id, quality)
    tracking.log_metrics({
        "exact_match": quality["exact_match"], "eos_share": quality["eos_share"],
        **{f"exact_match/{k}": v for k, v in quality["per_family"].items()},
        "build_seconds": report["build_seconds"], "peak_memory_gib": memory.peak_bytes / 2**30,
    })
    log.info("embedded base built in %.0f s: exact match %.3f, EOS share %.3f, per family %s",
             report["build_seconds"], quality["exact_match"], quality["eos_share"], quality["per_family"])
    return report


def _count_parameters(model_dir: Path) -> int:
    """Parameters in the saved weights, read from the safetensors headers without loading the tensors."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _plot(out: Path, run_id: str, quality: dict) -> None:
    """The pretraining loss curve and the per-family exact match, beside the model and in MLflow."""
    steps, losses = tracking.metric_history(run_id, "pretrain/loss")
    figures = [
        line_plot({"loss": (steps, losses)}, "Embedded base pretraining", "step", "loss (assistant tokens)",
                  out / "plots" / "pretrain_loss.png", log_y=True),
        bar_plot(quality["per_family"], "Held-out exact match per family", "share exactly right",
                 out / "plots" / "exact_match.png", ylim=(0, 1.05)),
    ]
    for figure in figures:
        tracking.log_artifact(figure, artifact_path="plots")


def build_report(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / REPORT_FILE).read_text())


def heldout_conversations(model_dir: Path) -> list[dict]:
    """The held-out conversations (OpenAI format records) the base was judged on."""
    return read_jsonl(Path(model_dir) / HELDOUT_FILE)
