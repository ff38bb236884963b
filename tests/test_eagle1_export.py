"""EAGLE-1 exports to vLLM's `method: eagle` layout, and vLLM's draft proposes exactly what ModelOpt's does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.base_model import model_fingerprint
from draftsmith.draft.checkpoint import DraftMeta, load_draft, save_draft
from draftsmith.draft.convert import base_state_keys, convert_base
from draftsmith.export.bundle import export_bundle
from draftsmith.export.check_export import check_eagle1_draft
from draftsmith.export.draft_export import ExportError
from draftsmith.recipe.schema import DraftSettings, ExportSettings

VOCAB, HIDDEN, STEPS = 512, 64, 3
PROPOSALS = Path(__file__).with_name("vllm_first_proposals.py")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny base, an EAGLE-1 draft with random non-trivial weights (norms too, so a dropped or misplaced norm
    shows), its checkpoint and its export."""
    root = tmp_path_factory.mktemp("eagle1")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=256, tie_word_embeddings=False)).save_pretrained(root / "base")
    model = convert_base(root / "base", DraftSettings(algorithm="eagle1"))
    with torch.no_grad():
        for name, param in model.eagle_module.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.copy_(torch.randn_like(param) * 2 / param.shape[-1] ** 0.5)
            param.copy_(param.to(torch.bfloat16))  # so the bf16 export holds exactly the weights ModelOpt ran
    meta = DraftMeta(**{"algorithm": "eagle1", "base_model_dir": str(root / "base"),
            "base_model_hash": model_fingerprint(root / "base"), "ttt_steps": STEPS, "draft_vocab_size": None,
            "quantization": None, "step": 0, "trained_steps": 0})
    checkpoint = save_draft(model, root / "ckpt", base_keys=base_state_keys(root / "base"), meta=meta)
    manifest = export_bundle(checkpoint=checkpoint, base_dir=root / "base",
                             base_hash=model_fingerprint(root / "base"), quantized_base_dir=None,
                             settings=ExportSettings(dtype="bfloat16", targets=["vllm", "trtllm"]),
                             out_dir=root / "export")
    return root, manifest


def test_eagle1_export_is_vllms_layout_and_says_why_tensorrt_llm_gets_none(exported):
    root, manifest = exported
    assert manifest.algorithm == "eagle1" and set(manifest.draft.variants) == {"vllm", "vllm_cpu"}
    assert list(manifest.engine_configs) == ["vllm"]
    assert "EAGLE-3 drafts only" in manifest.engines_without_config["trtllm"]
    config = json.loads((root / "export" / manifest.engine_configs["vllm"]).read_text())
    assert config["method"] == "eagle" and config["num_speculative_tokens"] == 3
    draft = root / "export" / manifest.draft.variants["vllm"]
    assert json.loads((draft / "config.json").read_text())["architectures"] == ["EagleLlamaForCausalLM"]
    check = manifest.draft.checks["vllm"]
    assert check["dtypes"] == ["bfloat16"] and check["aux_layer_ids"] is None
    # What vLLM's loader would refuse or silently leave uninitialised is refused here.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(draft / "model.safetensors"))
    for broken, message in [({**tensors, "lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)},
                             "refuses"),
                            ({k: v for k, v in tensors.items() if k != "layers.0.mlp.down_proj.weight"}, "lacks")]:
        save_file(broken, str(root / "broken.safetensors"))
        folder = root / f"broken-{message}"
        folder.mkdir()
        (folder / "config.json").write_text((draft / "config.json").read_text())
        (root / "broken.safetensors").rename(folder / "model.safetensors")
        with pytest.raises(ExportError, match=message):
            check_eagle1_draft(folder, hidden_size=HIDDEN, quantized=False)


@pytest.mark.slow
def test_vllm_proposes_what_modelopt_proposes_and_output_is_lossless(exported):
    """The export is exact: for each prompt, vLLM's first proposal (the base's token and the draft's 3 guesses)
    equals ModelOpt's `pseudo_speculative_generate` on the trained checkpoint, and the greedy output with the
    draft equals the base's own (float32 on both sides; the draft's weights are bf16-exact, so the export is too)."""
    root, manifest = exported
    loaded = load_draft(root / "ckpt", root / "base").model.eval()
    base = LlamaForCausalLM.from_pretrained(str(root / "base")).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (5, 12, 30)]
    wanted = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            picked, drafts = loaded.pseudo_speculative_generate(ids, steps=STEPS)
            greedy = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):]
            wanted.append({"base": picked[0].tolist(), "drafts": drafts[0].tolist(), "greedy": greedy.tolist()})
    (root / "prompts.json").write_text(json.dumps(prompts))
    speculative = {"method": "eagle", "model": str(root / "export" / manifest.draft.variants["vllm"]),
                   "num_speculative_tokens": STEPS}
    done = subprocess.run([sys.executable, str(PROPOSALS), str(root / "base"), json.dumps(speculative),
                           str(root / "prompts.json"), str(root / "vllm.json"), "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((root / "vllm.json").read_text())
    assert [(g["base"], g["drafts"]) for g in got] == [(w["base"], w["drafts"]) for w in wanted]
    assert [g["greedy"] for g in got] == [w["greedy"] for w in wanted]
