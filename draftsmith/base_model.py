"""Check that a folder is a Hugging Face causal LM the platform can use, and fingerprint it for lineage."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Bits per element of each safetensors dtype.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}


class BaseModelError(ValueError):
    """The configured base model cannot be used; the message says what is missing and how to fix it."""


def _fail(path: Path, reason: str) -> BaseModelError:
    return BaseModelError(
        f"base.model={path} is not a usable causal LM folder: {reason}. Expected a Hugging Face folder with "
        "config.json (a *ForCausalLM architecture), *.safetensors weights and tokenizer files, or a .gguf file; "
        "or set `base.model: embedded` to use the built-in default."
    )


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: the header parses, and every tensor's byte range
    fits its dtype and shape and lies inside the file, the ranges tiling the data exactly (what the format
    requires). Reads the header only, so it costs nothing on multi-gigabyte weights."""
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for the 8-byte header length"
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER, size - 8):
            return f"header length {header_len} does not fit in its {size} bytes"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data = size - 8 - header_len
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = DTYPE_BITS[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets"
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data):
            return f"tensor {name!r} lies outside the file's {data} data bytes"
        if (end - start) * 8 != count * width:
            return f"tensor {name!r}: {end - start} bytes for {count} {entry['dtype']} values"
        ranges.append((start, end))
    covered = 0
    for start, end in sorted(ranges):
        if start != covered:
            return "its tensors overlap or leave gaps"
        covered = end
    if covered != data:
        return f"its tensors cover {covered} of {data} data bytes"
    return None


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
    if not architectures:
        # model_type alone does not say it: BERT's maps to a causal-LM class too (BertLMHeadModel), and vLLM picks
        # the model class from `architectures` anyway.
        example = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")
        example = example if example.endswith("ForCausalLM") else "LlamaForCausalLM"
        raise _fail(folder, f"config.json lists no `architectures` (model_type {config.model_type!r}); add the "
                            f"model class, e.g. \"architectures\": [\"{example}\"], if it is a causal LM")
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise _fail(folder, f"architectures {architectures} (model_type {config.model_type!r}) is not a causal LM")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        hint = " (found PyTorch .bin weights: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise _fail(folder, f"no *.safetensors weights{hint}")
    for file in weights:
        problem = safetensors_problem(file)
        if problem is not None:
            raise _fail(folder, f"{file.name} is not a safetensors file ({problem}); re-download or re-save it")
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
