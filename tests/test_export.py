"""Export on a tiny Llama: runtime formats, per-runtime aux-layer ids, FP8 and its dequantized CPU variant,
engine configs checked against TensorRT-LLM's field list, and the bad inputs that must leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import run_job_here
from draftsmith.base_model import model_fingerprint
from draftsmith.draft.checkpoint import DraftCheckpointError, DraftMeta, save_draft
from draftsmith.draft.convert import convert_base, load_base
from draftsmith.draft.algorithms import draft_forward, get_algorithm
from draftsmith.draft.vocab import draft_vocabulary
from draftsmith.export.bundle import copy_export, export_bundle
from draftsmith.export.manifest import ManifestError, read_manifest
from draftsmith.export.check_export import check_eagle_draft
from draftsmith.export.draft_export import ExportError
from draftsmith.export.engine_configs import TRTLLM_FILE, VLLM_FILE
from draftsmith.export.trtllm_schema import EngineConfigError, check_trtllm_options
from draftsmith.quantization.formats import QuantizationError, check_format, modelopt_config
from draftsmith.recipe.schema import DraftSettings, ExportSettings

VOCAB, HIDDEN, DRAFT_VOCAB = 300, 64, 96


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=256, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 32))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones_like(ids)}


def _checkpoint(base_dir, folder, algorithm="eagle3", quantize=False, seed=0):
    reduced = get_algorithm(algorithm).capabilities.draft_vocabulary
    settings = DraftSettings.model_validate({"algorithm": algorithm, "seed": seed,
                                             "eagle": {"draft_vocab_size": DRAFT_VOCAB if reduced else None}})
    d2t = None
    if reduced:
        d2t = draft_vocabulary(np.arange(VOCAB, dtype=np.int64), DRAFT_VOCAB)[0]  # higher ids more frequent
    model = convert_base(base_dir, settings, d2t=d2t)
    base_keys = set(load_base(base_dir).state_dict())
    quantization = None
    if quantize:
        import modelopt.torch.quantization as mtq

        batch = _batch()
        model.train()

        def forward_loop(m):
            with torch.no_grad():
                draft_forward(m, batch, algorithm)

        mtq.quantize(model, modelopt_config("fp8", kv_cache=True, quantize_base=True), forward_loop)
        quantization = {"format": "fp8", "kv_cache": True, "base": True, "calibration_samples": 2}
    meta = DraftMeta(**{"algorithm": algorithm, "base_model_dir": str(base_dir),
                        "base_model_hash": model_fingerprint(base_dir),
            "ttt_steps": 3, "medusa_heads": 3, "draft_vocab_size": DRAFT_VOCAB if reduced else None,
            "quantization": quantization, "step": 0, "trained_steps": 0})
    return save_draft(model, folder, base_keys=base_keys, meta=meta)


def _export(base_dir, checkpoint, out_dir, **settings):
    return export_bundle(checkpoint=checkpoint, base_dir=base_dir, base_hash=model_fingerprint(base_dir),
                         quantized_base_dir=None, settings=ExportSettings(**settings), out_dir=out_dir)


def test_eagle3_export_matches_what_each_runtime_reads(base_dir, tmp_path):
    manifest = _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt"), tmp_path / "export")
    out = tmp_path / "export"
    assert manifest.draft.variants == {"trtllm": "draft", "vllm": "draft-vllm", "vllm_cpu": "draft-vllm"}
    trt_config = json.loads((out / "draft" / "config.json").read_text())
    vllm_config = json.loads((out / "draft-vllm" / "config.json").read_text())
    assert trt_config["architectures"] == ["LlamaForCausalLMEagle3"] and trt_config["draft_vocab_size"] == DRAFT_VOCAB
    aux = trt_config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert vllm_config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in aux]
    tensors = load_file(str(out / "draft" / "model.safetensors"))
    assert tensors["fc.weight"].shape == (HIDDEN, len(aux) * HIDDEN) and tensors["fc.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].shape == (DRAFT_VOCAB, HIDDEN) and tensors["d2t"].any()
    assert trt_config["torch_dtype"] == "bfloat16"
    assert (trt_config.get("rope_scaling") or {}).get("rope_type", "default") == "default"  # no YaRN injected

    options = yaml.safe_load((out / TRTLLM_FILE).read_text())
    spec = options["speculative_config"]
    assert spec["decoding_type"] == "Eagle" and spec["max_draft_len"] == 3  # the portable spellings
    assert spec["speculative_model_dir"] == str((out / "draft").resolve())
    assert spec.get("eagle3_layers_to_capture", aux) == aux  # set when the draft fuses other than 3 layers
    check_trtllm_options(options)
    vllm = json.loads((out / VLLM_FILE).read_text())
    assert vllm == {"method": "eagle3", "model": str((out / "draft-vllm").resolve()), "num_speculative_tokens": 3}


def test_trtllm_field_check_names_the_wrong_key(base_dir, tmp_path):
    _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt"), tmp_path / "export")
    options = yaml.safe_load((tmp_path / "export" / TRTLLM_FILE).read_text())
    check_trtllm_options(options)
    bad = json.loads(json.dumps(options))
    bad["speculative_config"]["speculative_model_dirr"] = bad["speculative_config"].pop("speculative_model_dir")
    with pytest.raises(EngineConfigError, match="speculative_config.speculative_model_dirr"):
        check_trtllm_options(bad)
    with pytest.raises(EngineConfigError, match="max_batchsize"):
        check_trtllm_options({**options, "max_batchsize": 8})
    with pytest.raises(EngineConfigError, match="kv_cache_config.free_memory"):
        check_trtllm_options({**options, "kv_cache_config": {"free_memory": 0.5}})
    with pytest.raises(EngineConfigError, match="decoding_type"):
        check_trtllm_options({**options, "speculative_config": {**options["speculative_config"],
                                                                "decoding_type": "Eagle4"}})
    with pytest.raises(EngineConfigError, match="not_a_field"):  # recipe extras are checked the same way
        _export(base_dir, tmp_path / "ckpt", tmp_path / "export2", trtllm={"extra": {"not_a_field": 1}})
    assert not (tmp_path / "export2").exists() and not (tmp_path / ".export2.tmp").exists()


def test_fp8_export_and_its_dequantized_cpu_variant(base_dir, tmp_path):
    manifest = _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt", quantize=True), tmp_path / "export")
    out = tmp_path / "export"
    assert manifest.draft.variants["vllm_cpu"] == "draft-vllm-dequantized"
    fp8 = load_file(str(out / "draft-vllm" / "model.safetensors"))
    deq = load_file(str(out / "draft-vllm-dequantized" / "model.safetensors"))
    assert fp8["fc.weight"].dtype == torch.float8_e4m3fn and "fc.weight_scale" in fp8 and "fc.input_scale" in fp8
    assert json.loads((out / "draft" / "config.json").read_text())["quantization_config"]["quantization"]["quant_algo"] == "FP8"
    assert deq["fc.weight"].dtype == torch.bfloat16 and not any(k.endswith("_scale") for k in deq)
    expected = (fp8["fc.weight"].float() * fp8["fc.weight_scale"].float()).to(torch.bfloat16)
    assert torch.equal(deq["fc.weight"], expected)
    assert "quantization_config" not in json.loads((out / "draft-vllm-dequantized" / "config.json").read_text())
    assert yaml.safe_load((out / TRTLLM_FILE).read_text())["kv_cache_config"]["dtype"] == "fp8"


def test_medusa_exports_heads_for_vllm_and_says_tensorrt_llm_cannot_load_them(base_dir, tmp_path):
    manifest = _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt", algorithm="medusa"), tmp_path / "export")
    assert manifest.draft.variants == {"trtllm": "draft", "vllm": "draft-vllm", "vllm_cpu": "draft-vllm"}
    assert manifest.draft.checks["trtllm"]["medusa_heads"] == 3
    heads = load_file(str(tmp_path / "export" / "draft-vllm" / "model.safetensors"))
    assert set(heads) == {f"{h}.0.linear.{p}" for h in range(3) for p in ("weight", "bias")} | \
        {f"{h}.1.weight" for h in range(3)}  # FasterDecoding's layout, which vLLM's Medusa loader remaps
    config = json.loads((tmp_path / "export" / "draft-vllm" / "config.json").read_text())
    assert config["architectures"] == ["MedusaModel"] and config["num_heads"] == 3 and config["medusa_fc_bias"]
    # Current TensorRT-LLM has no Medusa (it ran only on the engine backend it dropped): no config, and why.
    assert set(manifest.engine_configs) == {"vllm"} and set(manifest.engines_without_config) == {"trtllm"}
    assert not (tmp_path / "export" / TRTLLM_FILE).exists()
    assert json.loads((tmp_path / "export" / VLLM_FILE).read_text())["method"] == "medusa"


def test_a_folder_holding_another_export_is_refused(base_dir, tmp_path):
    first = _export(base_dir, _checkpoint(base_dir, tmp_path / "a"), tmp_path / "export")
    with pytest.raises(ExportError, match="already holds the export of another draft"):
        _export(base_dir, _checkpoint(base_dir, tmp_path / "b", seed=1), tmp_path / "export")
    assert read_manifest(tmp_path / "export").draft.checkpoint_digest == first.draft.checkpoint_digest
    assert _export(base_dir, tmp_path / "a", tmp_path / "export") == first  # the same draft again: a no-op
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export"):
        copy_export(tmp_path / "export", tmp_path / "busy")
    copied = copy_export(tmp_path / "export", tmp_path / "shipped")
    options = yaml.safe_load((copied / TRTLLM_FILE).read_text())
    assert options["speculative_config"]["speculative_model_dir"] == str((copied / "draft").resolve())


def test_a_checkpoint_without_a_draft_leaves_nothing_behind(base_dir, tmp_path):
    checkpoint = _checkpoint(base_dir, tmp_path / "ckpt")
    tensors = load_file(str(checkpoint / "draft.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("eagle_module.")},
              str(checkpoint / "draft.safetensors"))
    with pytest.raises(DraftCheckpointError):
        _export(base_dir, checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / ".export.tmp").exists()
    with pytest.raises(DraftCheckpointError, match="not a draft checkpoint"):
        _export(base_dir, base_dir, tmp_path / "export")


def test_an_all_zero_d2t_is_refused(base_dir, tmp_path):
    _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt"), tmp_path / "export")
    folder = tmp_path / "export" / "draft"
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["d2t"] = torch.zeros_like(tensors["d2t"])
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match="all zeros"):
        check_eagle_draft(folder, hidden_size=HIDDEN, vocab_size=VOCAB, num_aux=2, draft_vocab_size=DRAFT_VOCAB,
                          quantized=False)


def test_formats_that_need_cuda_are_refused_on_cpu(tmp_path):
    check_format("fp8", use_gpu=False)
    check_format("nvfp4", use_gpu=True)
    with pytest.raises(QuantizationError, match="needs a CUDA device"):
        check_format("nvfp4", use_gpu=False)
    proc = run_job_here("jobs.quantize", "--recipe", "tiny-eagle3", "--set", "quantization.format=nvfp4",
                   "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 2 and "quantization.format=nvfp4 needs a CUDA device" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # refused before any stage ran


def test_a_manifest_from_another_layout_is_refused_naming_the_key(base_dir, tmp_path):
    """Everything that opens an export reads its manifest through one typed model: a renamed or missing key fails
    at the door with the key named, and a round trip recorded before it was typed (`{"skipped": true}`) loads."""
    manifest = _export(base_dir, _checkpoint(base_dir, tmp_path / "ckpt"), tmp_path / "export")
    assert manifest == read_manifest(tmp_path / "export") and manifest.verification is None
    record = json.loads((tmp_path / "export" / "manifest.json").read_text())
    record["verification"] = {"skipped": True}
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(record))
    assert read_manifest(tmp_path / "export").verification is None
    renamed = {("variant" if k == "variants" else k): v for k, v in record["draft"].items()}
    for broken, key in [({**record, "draft": renamed}, "draft.variant"),
                        ({**record, "algorithm": "eagle9"}, "algorithm"),
                        ({**record, "format": "draftsmith-export/0"}, "format")]:
        (tmp_path / "export" / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ManifestError, match=key):
            read_manifest(tmp_path / "export")


def test_drill_a_disk_that_fills_during_the_export_leaves_nothing_half_written(base_dir, tmp_path):
    """Fault drill: the exporting process runs out of room mid-write (its file-size limit stands in for a full
    disk: `write()` fails the same way, part of a file written). Nothing is left that looks finished: no export
    folder, no temporary one, so the stage runs again."""
    import subprocess
    import sys
    import textwrap

    checkpoint, out = _checkpoint(base_dir, tmp_path / "ckpt"), tmp_path / "export"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from draftsmith.base_model import model_fingerprint
        from draftsmith.export.bundle import export_bundle
        from draftsmith.recipe.schema import ExportSettings

        base = Path({str(base_dir)!r})
        digest = model_fingerprint(base)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with an OSError instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        try:
            export_bundle(checkpoint=Path({str(checkpoint)!r}), base_dir=base, base_hash=digest,
                          quantized_base_dir=None, settings=ExportSettings(), out_dir=Path({str(out)!r}))
        except Exception as exc:  # OSError from Python's writes, SafetensorError from safetensors' own
            print("write failed:", type(exc).__name__, exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "write failed" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert not out.exists() and not (tmp_path / ".export.tmp").exists()  # (with room, it is any export above)
