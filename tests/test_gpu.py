"""What needs a CUDA device, run by `make gpu-check` (skipped elsewhere): EAGLE-3 training steps on the embedded
base in bf16, and ModelOpt FP8 and NVFP4 quantization of a draft through the quantize stage's own code, then its
export. Neither Ray nor DeepSpeed nor vLLM is needed (the GPU machine has none of them); the figures go to
$DRAFTSMITH_GPU_FIGURES (default gpu-check/figures.json)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.gpu

FIGURES = Path(os.environ.get("DRAFTSMITH_GPU_FIGURES", ROOT / "gpu-check" / "figures.json"))


@pytest.fixture(scope="module")
def figures():
    found: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    yield found
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(found, indent=2))


@pytest.fixture(scope="module")
def base_dir() -> Path:
    """The embedded test base: $DRAFTSMITH_GPU_BASE (what `make gpu-check-prepare` carries), else the test cache's."""
    from draftsmith.recipe.loader import load_recipe
    from conftest import TINY_BASE_OVERRIDES

    if os.environ.get("DRAFTSMITH_GPU_BASE"):
        folder = Path(os.environ["DRAFTSMITH_GPU_BASE"])
    else:
        from draftsmith.embedded.build import embedded_base_dir

        folder = embedded_base_dir(load_recipe("tiny-eagle3", TINY_BASE_OVERRIDES).base.embedded)
    if not (folder / "model.safetensors").is_file():
        pytest.fail(f"no embedded base at {folder}: run `make gpu-check-prepare` where Ray runs, and carry .gpu-check")
    return folder


@pytest.fixture(scope="module")
def data_dir(base_dir, tmp_path_factory) -> Path:
    """The base's held-out conversations tokenized as the dataset stage lays them out (train/ and validation/)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from draftsmith.training.layout import TRAIN_DIR, VALIDATION_DIR

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = []
    for line in (base_dir / "corpus" / "heldout.jsonl").read_text().splitlines():
        out = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
        rows.append({"input_ids": ids, "target_mask": mask, "num_tokens": len(ids)})
    folder = tmp_path_factory.mktemp("gpu-data")
    for split, part in ((TRAIN_DIR, rows[4:]), (VALIDATION_DIR, rows[:4])):
        (folder / split).mkdir()
        pq.write_table(pa.Table.from_pylist(part), folder / split / "part-0.parquet")
    return folder


def _batches(data_dir: Path, base_dir: Path, count: int, device: str) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from draftsmith.quantization.quantize_draft import sample_batches

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [{k: v.to(device) for k, v in b.items()} for b in sample_batches(data_dir, "train", count, 8, pad)]


def _settings():
    from draftsmith.recipe.schema import DraftSettings

    return DraftSettings.model_validate({"algorithm": "eagle3"})


def test_eagle3_trains_in_bf16_on_cuda(base_dir, data_dir, figures):
    from draftsmith.draft.convert import convert_base
    from draftsmith.draft.algorithms import draft_forward

    model = convert_base(base_dir, _settings(), dtype="bfloat16").to("cuda")
    batches = _batches(data_dir, base_dir, 16, "cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, tokens = [], 0
    torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(40):
        batch = batches[step % len(batches)]
        loss, acc = draft_forward(model, batch, "eagle3")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    figures["eagle3_bf16_training"] = {
        "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "tokens_per_s": tokens / seconds,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "last_acc_per_step": acc}
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # The same few batches over and over: a draft that learns anything fits them.
    assert sum(losses[-len(batches):]) < 0.8 * sum(losses[: len(batches)]), losses


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantize_and_export_on_cuda(fmt, base_dir, data_dir, tmp_path, figures):
    from safetensors.torch import load_file

    from draftsmith.base_model import model_fingerprint
    from draftsmith.draft.checkpoint import DraftMeta, save_draft
    from draftsmith.draft.convert import base_state_keys, convert_base
    from draftsmith.export.bundle import export_bundle
    from draftsmith.quantization.quantize_draft import quantize_checkpoint
    from draftsmith.recipe.schema import ExportSettings, QuantizationSettings

    draft = save_draft(convert_base(base_dir, _settings()), tmp_path / "draft", base_keys=base_state_keys(base_dir),
                       meta=DraftMeta(**{"algorithm": "eagle3", "base_model_dir": str(base_dir),
                             "base_model_hash": model_fingerprint(base_dir), "ttt_steps": 3, "medusa_heads": 3,
                             "draft_vocab_size": None, "quantization": None, "step": 0, "trained_steps": 0}))
    (tmp_path / "q").mkdir()
    started = time.perf_counter()
    quantized = quantize_checkpoint(
        checkpoint=draft, base_dir=base_dir, data_dir=data_dir, micro_batch_size=8, validation_samples=4,
        settings=QuantizationSettings(format=fmt, calibration_samples=16), out_dir=tmp_path / "q", device="cuda")
    quantize_s = time.perf_counter() - started
    assert quantized["quantizers"]["draft"] > 0 and quantized["quantizers"]["base"] > 0
    assert (Path(quantized["quantized_base_dir"]) / "hf_quant_config.json").is_file()
    manifest = export_bundle(checkpoint=Path(quantized["draft_dir"]), base_dir=base_dir,
                             base_hash=model_fingerprint(base_dir),
                             quantized_base_dir=Path(quantized["quantized_base_dir"]),
                             settings=ExportSettings(verify_prompts=0), out_dir=tmp_path / "export")
    tensors = load_file(str(tmp_path / "export" / "draft" / "model.safetensors"))
    fc = tensors["fc.weight"]
    if fmt == "fp8":
        assert fc.dtype == torch.float8_e4m3fn and "fc.weight_scale" in tensors
    else:  # NVFP4: two 4-bit values a byte, a per-block FP8 scale and a per-tensor scale
        fused = len(manifest.draft.aux_layer_ids) * tensors["norm.weight"].shape[0]  # aux layers x hidden
        assert fc.dtype == torch.uint8 and fc.shape[-1] * 2 == fused, fc.shape
        assert tensors["fc.weight_scale"].dtype == torch.float8_e4m3fn and "fc.weight_scale_2" in tensors
    figures[f"{fmt}_quantize_export"] = {
        "quantize_s": quantize_s, "quantizers": quantized["quantizers"],
        "validation_loss": {k: v["loss"] for k, v in quantized["validation"].items()},
        "variants": manifest.draft.variants, "fc_weight": [str(fc.dtype), list(fc.shape)]}

