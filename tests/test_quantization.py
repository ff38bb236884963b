"""Fake quantization formats on CPU: which quantizers each format puts where, QAT gradients through them, and the
export of each (FP8/INT8 also as a dequantized draft for vLLM's CPU build)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.base_model import model_fingerprint
from draftsmith.draft.checkpoint import DraftMeta, load_draft, save_draft
from draftsmith.draft.convert import base_state_keys, convert_base
from draftsmith.draft.algorithms import draft_forward
from draftsmith.export.bundle import export_bundle
from draftsmith.quantization.formats import enabled_quantizers, modelopt_config
from draftsmith.recipe.schema import DraftSettings, ExportSettings

VOCAB = 300


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    # widths are multiples of 128: INT4-AWQ packs weights in blocks of 128 input columns
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=256, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones_like(ids)}


def _quantized(base_dir, fmt: str, quantize_base: bool):
    import modelopt.torch.quantization as mtq

    model = convert_base(base_dir, DraftSettings())
    model.train()

    def forward_loop(m):
        with torch.no_grad():
            for seed in range(2):
                draft_forward(m, _batch(seed), "eagle3")

    mtq.quantize(model, modelopt_config(fmt, kv_cache=True, quantize_base=quantize_base), forward_loop)
    return model


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4_awq"])
def test_each_cpu_format_quantizes_and_passes_qat_gradients(base_dir, fmt):
    model = _quantized(base_dir, fmt, quantize_base=True)
    counts = enabled_quantizers(model)
    assert counts["draft"] > 0 and counts["base"] > 0
    loss, _ = draft_forward(model, _batch(5), "eagle3")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("eagle_module.") for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("proj.weight"))


def test_draft_only_quantization_leaves_the_base_unquantized(base_dir):
    counts = enabled_quantizers(_quantized(base_dir, "fp8", quantize_base=False))
    assert counts["base"] == 0 and counts["draft"] > 0


@pytest.mark.parametrize("fmt,cpu_variant", [("int8", "draft-vllm-dequantized"), ("int4_awq", None)])
def test_quantized_checkpoint_restores_and_exports(base_dir, tmp_path, fmt, cpu_variant):
    model = _quantized(base_dir, fmt, quantize_base=True)
    reference = draft_forward(model, _batch(7), "eagle3")[0].item()
    meta = DraftMeta(**{"algorithm": "eagle3", "base_model_dir": str(base_dir),
                        "base_model_hash": model_fingerprint(base_dir),
            "ttt_steps": 3, "medusa_heads": 3, "draft_vocab_size": None, "step": 0, "trained_steps": 0,
            "quantization": {"format": fmt, "kv_cache": True, "base": True, "calibration_samples": 4}})
    save_draft(model, tmp_path / "ckpt", base_keys=base_state_keys(base_dir), meta=meta)
    restored = load_draft(tmp_path / "ckpt", base_dir).model
    restored.train()
    # int4_awq restores to within float rounding (3e-5 relative seen), the others exactly
    assert draft_forward(restored, _batch(7), "eagle3")[0].item() == pytest.approx(reference, rel=1e-4)

    manifest = export_bundle(checkpoint=tmp_path / "ckpt", base_dir=base_dir, base_hash=meta.base_model_hash,
                             quantized_base_dir=None, settings=ExportSettings(), out_dir=tmp_path / "export")
    assert manifest.draft.variants.get("vllm_cpu") == cpu_variant
    assert manifest.draft.checks["trtllm"]["quantized_weights"] > 0
    config = json.loads((tmp_path / "export" / "draft" / "config.json").read_text())
    assert {"int8": "W8A8", "int4_awq": "AWQ"}[fmt] in config["quantization_config"]["quantization"]["quant_algo"]
    if cpu_variant:
        tensors = load_file(str(tmp_path / "export" / cpu_variant / "model.safetensors"))
        assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k.endswith(".weight"))
