"""Check that a folder is a Hugging Face causal LM the platform can use, and fingerprint it for lineage."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class BaseModelError(ValueError):
    """The configured base model cannot be used; the message says what is missing and how to fix it."""


def _fail(path: Path, reason: str) -> BaseModelError:
    return BaseModelError(
        f"base.model={path} is not a usable causal LM folder: {reason}. Expected a Hugging Face folder with "
        "config.json (a *ForCausalLM architecture), *.safetensors weights and tokenizer files, or a .gguf file; "
        "or set `base.model: embedded` to use the built-in default."
    )


def validate_causal_lm_folder(path: str | Path) -> Path:
    """Raise BaseModelError unless `path` holds a config, safetensors weights and a tokenizer of a causal LM."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _fail(folder, "no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _fail(folder, "config.json is missing")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise _fail(folder, f"config.json is not valid JSON ({exc})") from None
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise _fail(folder, f"transformers cannot read config.json ({exc})") from None
    architectures = raw.get("architectures") or []
    is_causal = any(a.endswith("ForCausalLM") for a in architectures) or (
        not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not is_causal:
        raise _fail(folder, f"architectures {architectures} (model_type {config.model_type!r}) is not a causal LM")
    if not list(folder.glob("*.safetensors")):
        hint = " (found PyTorch .bin weights: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise _fail(folder, f"no *.safetensors weights{hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise _fail(folder, f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return folder


def resolve_base_folder(spec: str) -> Path:
    """The Hugging Face folder that `base.model` names: the folder itself, or a GGUF file's converted folder
    (converted on first use, then cached by the file's digest; see draftsmith/gguf_base.py)."""
    from draftsmith.gguf_base import gguf_base_folder, gguf_file

    path = gguf_file(spec)
    return validate_causal_lm_folder(gguf_base_folder(path) if path is not None else spec).resolve()


def model_fingerprint(path: str | Path) -> str:
    """A cheap identity for a model folder: config, tokenizer config, and each weight file's size and header.

    Safetensors headers list every tensor's name, dtype, shape and byte range, so a change of architecture or
    of any tensor's layout changes the fingerprint without reading gigabytes of weights.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        with open(weights, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(8 + header_len, size // 2))
            digest.update(f.read(1 << 20))  # a slice of the tensor data, so retrained weights differ too
        digest.update(f"{weights.name}:{size}".encode())
    return digest.hexdigest()[:16]
