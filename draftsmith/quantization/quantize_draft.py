"""Post-training fake quantization of a trained draft checkpoint (and its base), calibrated on conversations.

The converted model (frozen base + draft) gets ModelOpt's quantizers, calibrated by running the training forward
on a sample of the training conversations, so the draft's quantizers see the features the quantized base gives
it. The result is a draft checkpoint like any other (ModelOpt state with the quantize mode, draft tensors and
every quantizer's scale); training continues from it for QAT. When the base is to be quantized too, the base
alone is calibrated on the same batches and written as a Hugging Face checkpoint with its quantization config.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from draftsmith.draft.checkpoint import load_draft, save_draft
from draftsmith.draft.convert import load_base
from draftsmith.draft.algorithms import draft_forward
from draftsmith.quantization.formats import enabled_quantizers, modelopt_config
from draftsmith.recipe.schema import QuantizationSettings
from draftsmith.training.batching import collate
from draftsmith.training.layout import read_split

log = logging.getLogger(__name__)

DRAFT_DIR = "draft"
BASE_DIR = "base"
SUMMARY_FILE = "quant_summary.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def sample_batches(data_dir: Path, split: str, count: int, micro_batch_size: int, pad_id: int
                   ) -> list[dict[str, torch.Tensor]]:
    """The first `count` conversations of a split (files in name order: deterministic), in length-sorted batches."""
    table = read_split(data_dir, split, ["input_ids", "target_mask", "num_tokens"], limit=count)
    rows = sorted(table.to_pylist(), key=lambda r: r["num_tokens"])
    return [collate(rows[i:i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]


def evaluate(model: torch.nn.Module, batches: list[dict], algorithm: str) -> dict[str, float]:
    """Mean loss and per-step top-1 accuracy over `batches` (training forward, no gradients)."""
    model.train()  # ModelOpt unrolls every TTT step only in training mode
    losses, accs = [], []
    with torch.no_grad():
        for batch in batches:
            loss, acc = draft_forward(model, batch, algorithm)
            losses.append(loss.item())
            accs.append(acc)
    metrics = {"loss": sum(losses) / len(losses)}
    metrics.update({f"acc_step{k + 1}": sum(a[k] for a in accs) / len(accs) for k in range(len(accs[0]))})
    return metrics


def _quant_summary(model: torch.nn.Module) -> str:
    import modelopt.torch.quantization as mtq

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        mtq.print_quant_summary(model)
    return buffer.getvalue()


def quantize_base_checkpoint(base_dir: Path, config: dict, batches: list[dict], out_dir: Path, dtype: torch.dtype,
                             device: str = "cpu") -> Path:
    """The base alone, quantized with `config` and calibrated on `batches`, exported as a HF checkpoint."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import export_hf_checkpoint

    base = load_base(base_dir).to(device)
    base.eval()

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    mtq.quantize(base, config, forward_loop)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf_checkpoint(base, dtype=dtype, export_dir=str(tmp))
    for name in TOKENIZER_FILES:  # the runtimes load the tokenizer from the model folder
        if (Path(base_dir) / name).is_file():
            shutil.copy2(Path(base_dir) / name, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def quantize_checkpoint(*, checkpoint: Path, base_dir: Path, data_dir: Path, settings: QuantizationSettings,
                        micro_batch_size: int, validation_samples: int, out_dir: Path, device: str = "cpu"
                        ) -> dict[str, Any]:
    """Quantize the trained draft at `checkpoint` into OUT/draft (and the base into OUT/base); returns a summary
    with the validation loss and accuracies before and after quantization."""
    import modelopt.torch.quantization as mtq

    loaded = load_draft(checkpoint, base_dir)
    model, algorithm = loaded.model.to(device), loaded.meta.algorithm
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def on_device(batches: list[dict]) -> list[dict]:
        return [{k: v.to(device) for k, v in b.items()} for b in batches]

    calibration = on_device(sample_batches(data_dir, "train", settings.calibration_samples, micro_batch_size, pad_id))
    validation = on_device(sample_batches(data_dir, "validation", validation_samples, micro_batch_size, pad_id))
    before = evaluate(model, validation, algorithm)

    config = modelopt_config(settings.format, kv_cache=settings.quantize_kv_cache,
                             quantize_base=settings.quantize_base)

    def forward_loop(m: torch.nn.Module) -> None:
        m.train()
        with torch.no_grad():
            for batch in calibration:
                draft_forward(m, batch, algorithm)

    mtq.quantize(model, config, forward_loop)
    counts = enabled_quantizers(model)
    if counts["draft"] == 0:
        raise ValueError(f"quantization.format={settings.format} put no quantizer on the draft module")
    after = evaluate(model, validation, algorithm)
    summary_text = _quant_summary(model)
    (out_dir / SUMMARY_FILE).write_text(summary_text)
    quantization = {"format": settings.format, "kv_cache": settings.quantize_kv_cache,
                    "base": settings.quantize_base, "calibration_samples": sum(len(b["input_ids"]) for b in calibration)}
    save_draft(model.to("cpu"), out_dir / DRAFT_DIR, base_keys=loaded.base_keys,
               meta=loaded.meta.model_copy(update={"quantization": quantization, "step": 0}))
    del model, loaded  # the base alone comes next: do not hold two copies of it on the device
    base_export = None
    if settings.quantize_base:
        base_export = str(quantize_base_checkpoint(base_dir, config, calibration, out_dir / BASE_DIR,
                                                   torch.bfloat16, device).resolve())
    result = {"draft_dir": str((out_dir / DRAFT_DIR).resolve()), "quantized_base_dir": base_export,
              "quantization": quantization, "quantizers": counts,
              "validation": {"bf16": before, "ptq": after}}
    (out_dir / "quantize_summary.json").write_text(json.dumps(result, indent=2))
    log.info("quantized to %s: %s; validation loss %.4f -> %.4f", settings.format, counts, before["loss"],
             after["loss"])
    return result
