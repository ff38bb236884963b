"""Draft conversion with ModelOpt on tiny Llama and Qwen bases: sizing, frozen base, exact save/restore, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

from draftsmith.draft.algorithms import DraftConfigError, get_algorithm
from draftsmith.draft.checkpoint import (DraftCheckpointError, DraftMeta, check_compatible, load_draft,
                                         save_draft)
from draftsmith.draft.convert import convert_base, load_base
from draftsmith.draft.algorithms import draft_forward
from draftsmith.draft.vocab import draft_vocabulary
from draftsmith.recipe.schema import DraftSettings
from draftsmith.base_model import model_fingerprint
from conftest import run_job_here

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def _tiny_base(kind: str, folder) -> str:
    config_cls, model_cls = BASES[kind]
    torch.manual_seed(0)
    model_cls(config_cls(**SIZES, tie_word_embeddings=False)).save_pretrained(folder)
    return str(folder)


def _batch(n: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, SIZES["vocab_size"], (n, length))
    target = torch.zeros_like(ids)
    target[:, length // 2:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}


def _settings(algorithm: str, **eagle) -> DraftSettings:
    return DraftSettings.model_validate({"algorithm": algorithm, "eagle": eagle})


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("algorithm", ["eagle3", "eagle1", "medusa", "dflash"])
def test_converts_trains_and_restores_exactly(kind, algorithm, tmp_path):
    base_dir = _tiny_base(kind, tmp_path / "base")
    reduced = get_algorithm(algorithm).capabilities.draft_vocabulary
    settings = _settings(algorithm, draft_vocab_size=128) if reduced else _settings(algorithm)
    d2t = None
    if reduced:
        counts = np.arange(SIZES["vocab_size"])[::-1].copy()  # lower ids are more frequent
        d2t = draft_vocabulary(counts, 128)[0]
    model = convert_base(base_dir, settings, d2t=d2t)
    prefix = get_algorithm(algorithm).prefix
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(prefix) for n in trainable)  # the base is frozen, the draft is not

    if algorithm == "eagle3":  # sized from the base: fc fuses ModelOpt's default layers (1 and 0 of 4)
        assert model.eagle_config.eagle_aux_hidden_state_layer_ids == [0, 1]
        assert model.eagle_module.fc.weight.shape == (64, 2 * 64)
        assert model.eagle_module.layers[0].mlp.up_proj.weight.shape == (128, 64)
    if algorithm == "dflash":  # sized from the base, not ModelOpt's Qwen3 defaults; never the base's last layer
        assert model.target_layer_ids == [2] and model.dflash_module.fc.weight.shape == (64, 64)
        assert model.dflash_module.layers[0].mlp.up_proj.weight.shape == (128, 64)
    if algorithm == "eagle1":  # vLLM's layout: no input norm on the first layer
        assert isinstance(model.eagle_module.layers[0].input_layernorm, torch.nn.Identity)
    if reduced:
        assert torch.equal(model.eagle_module.d2t, torch.zeros(128, dtype=torch.long))  # ids 0..127 kept: no offset
        assert torch.equal(model.eagle_module.lm_head.weight, model.lm_head.weight[:128])

    model.train()
    loss, accuracies = draft_forward(model, _batch(), algorithm)
    loss.backward()
    assert torch.isfinite(loss) and len(accuracies) == (1 if algorithm == "dflash" else 3)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(prefix))

    base_keys = set(load_base(base_dir).state_dict())
    meta = DraftMeta(algorithm=algorithm, base_model_hash=model_fingerprint(base_dir), base_model_dir=str(base_dir))
    save_draft(model, tmp_path / "draft", base_keys=base_keys, meta=meta)
    stored = load_file(str(tmp_path / "draft" / "draft.safetensors"))
    assert stored and all(k.startswith(prefix) for k in stored)  # the base is never copied into a checkpoint

    restored = load_draft(tmp_path / "draft", base_dir).model
    restored.train()
    batch = _batch()
    torch.manual_seed(1)
    expected = draft_forward(model, batch, algorithm)[0]
    torch.manual_seed(1)
    assert torch.allclose(draft_forward(restored, batch, algorithm)[0], expected)


def test_draft_vocabulary_keeps_the_most_frequent_tokens():
    counts = np.zeros(10, dtype=np.int64)
    counts[[2, 7, 9]] = [5, 50, 1]
    d2t, t2d, report = draft_vocabulary(counts, 3)
    assert (torch.arange(3) + d2t).tolist() == [2, 7, 9]
    assert t2d.nonzero().flatten().tolist() == [2, 7, 9]
    assert report["target_token_coverage"] == 1.0
    # Fewer seen tokens than slots: unseen ones fill by lowest id, never a duplicate.
    targets = (torch.arange(5) + draft_vocabulary(counts, 5)[0]).tolist()
    assert targets == [0, 1, 2, 7, 9]


def test_draft_that_does_not_fit_the_base_fails_clearly(tmp_path):
    config = LlamaConfig(**SIZES)
    with pytest.raises(DraftConfigError, match=r"aux_hidden_state_layer_ids=\[1, 9\].*0\.\.3"):
        get_algorithm("eagle3").convert_spec(_settings("eagle3", aux_hidden_state_layer_ids=[1, 9]), config)
    with pytest.raises(DraftConfigError, match="draft_vocab_size=4096 exceeds the base vocabulary"):
        get_algorithm("eagle3").convert_spec(_settings("eagle3", draft_vocab_size=4096), config)
    with pytest.raises(DraftConfigError, match="algorithm=eagle1"):
        get_algorithm("eagle1").convert_spec(_settings("eagle1", aux_hidden_state_layer_ids=[0]), config)
    with pytest.raises(DraftConfigError, match="EAGLE-1 loader has no reduced draft vocabulary"):
        get_algorithm("eagle1").convert_spec(_settings("eagle1", draft_vocab_size=128), config)
    with pytest.raises(ValueError, match="unknown draft algorithm 'eagle2'; the registered ones are eagle3, eagle1"):
        _settings("eagle2")


def test_base_modelopt_cannot_convert_fails_clearly(tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DraftConfigError, match="base \\(gpt2\\) has no intermediate_size"):
        convert_base(tmp_path / "gpt2", _settings("eagle3"))
    with pytest.raises(DraftConfigError, match="ModelOpt cannot attach a eagle3 draft .*'gpt2'"):
        convert_base(tmp_path / "gpt2", _settings("eagle3", intermediate_size=128))


def test_checkpoint_from_another_algorithm_or_base_is_refused(tmp_path):
    base_dir = _tiny_base("llama", tmp_path / "base")
    model = convert_base(base_dir, _settings("medusa"))
    meta = DraftMeta(algorithm="medusa", base_model_hash=model_fingerprint(base_dir), base_model_dir=str(base_dir))
    save_draft(model, tmp_path / "draft", base_keys=set(load_base(base_dir).state_dict()), meta=meta)
    with pytest.raises(DraftCheckpointError, match="holds a medusa draft but the recipe trains draft.algorithm=eagle3"):
        check_compatible(tmp_path / "draft", algorithm="eagle3", base_dir=base_dir)
    other = _tiny_base("qwen2", tmp_path / "other")
    with pytest.raises(DraftCheckpointError, match="was made for base"):
        check_compatible(tmp_path / "draft", algorithm="medusa", base_dir=other)
    # A meta file of another algorithm's name or with keys this version does not know: one line naming the file.
    meta_file = tmp_path / "draft" / "draft_meta.json"
    record = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**record, "algorithm": "hydra"}))
    with pytest.raises(DraftCheckpointError, match=r"draft_meta.json: unknown draft algorithm 'hydra'"):
        check_compatible(tmp_path / "draft", algorithm="medusa", base_dir=base_dir)
    meta_file.write_text(json.dumps({**record, "heads": 3}))
    with pytest.raises(DraftCheckpointError, match=r"draft_meta.json: key 'heads': Extra inputs are not permitted"):
        check_compatible(tmp_path / "draft", algorithm="medusa", base_dir=base_dir)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(DraftCheckpointError, match="not a draft checkpoint"):
        check_compatible(tmp_path, algorithm="medusa", base_dir=other)


def test_convert_job_rejects_a_draft_that_does_not_fit_before_anything_runs(tmp_path):
    result = run_job_here("jobs.convert", "--recipe", "tiny-eagle3", "--set", "draft.eagle.aux_hidden_state_layer_ids=[0,9]",
                     "--set", f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "aux_hidden_state_layer_ids=[0, 9] must be distinct base layers in 0..3" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()  # nothing started
