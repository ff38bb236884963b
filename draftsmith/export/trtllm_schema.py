"""TensorRT-LLM's LLM API option names, read from its source (it cannot be installed here), and the check that an
options dict uses only those names.

`trtllm_fields.json` (beside this file) lists the pydantic fields of `TorchLlmArgs` and its bases, of the
speculative decoding configs, and of the nested KV-cache, CUDA-graph and scheduler configs; its `source` entry
names the release and commit it was read from. TensorRT-LLM's own models forbid unknown keys, so a misspelled
key fails at `trtllm-serve` start-up on the GPU node; this check fails it at export instead.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

FIELDS_FILE = Path(__file__).with_name("trtllm_fields.json")
NESTED = ("kv_cache_config", "cuda_graph_config", "scheduler_config")


class EngineConfigError(ValueError):
    """An engine config has a key or value its engine does not accept."""


@functools.lru_cache(maxsize=1)
def trtllm_fields() -> dict[str, Any]:
    return json.loads(FIELDS_FILE.read_text())


def _source() -> str:
    src = trtllm_fields()["source"]
    return f"TensorRT-LLM {src.get('version', '?')} ({src['path']} @ {src['commit'][:10]})"


def _unknown(keys: Any, allowed: Any, where: str) -> list[str]:
    problems = []
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}{key}{hint}")
    return problems


def check_trtllm_options(options: dict[str, Any]) -> None:
    """Raise EngineConfigError naming every key TensorRT-LLM would reject."""
    fields = trtllm_fields()
    problems = _unknown(options, fields["top_level"], "")
    for name in NESTED:
        if isinstance(options.get(name), dict):
            problems += _unknown(options[name], fields[name], f"{name}.")
    spec = options.get("speculative_config")
    if isinstance(spec, dict):
        decoding_type = spec.get("decoding_type")
        cls = fields["decoding_types"].get(decoding_type)
        if cls is None:
            problems.append(f"speculative_config.decoding_type={decoding_type!r} (accepted: "
                            f"{sorted(fields['decoding_types'])})")
        elif cls in fields["speculative_config"]:  # the field lists kept here: the base and the EAGLE configs
            aliases = {k.split(".", 1)[1] for k in fields["aliases"] if k.startswith("speculative_config.")}
            allowed = {*fields["speculative_config"]["DecodingBaseConfig"], *fields["speculative_config"][cls],
                       *aliases}
            problems += _unknown(spec, allowed, "speculative_config.")
    if problems:
        raise EngineConfigError(f"TensorRT-LLM options with keys it does not accept: {problems}; field list from "
                                f"{_source()}")
