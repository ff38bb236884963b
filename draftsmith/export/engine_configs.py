"""Engine configs for an export: TensorRT-LLM's `extra_llm_api_options` YAML and vLLM's `speculative_config`.

Paths inside them are absolute for the folder they were written in; `relocated_engine_config()` points them at
wherever the export lives now (a copy, a registry download, a Serve replica).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from draftsmith.draft.algorithms import DraftAlgorithm, get_algorithm
from draftsmith.export.trtllm_schema import check_trtllm_options
from draftsmith.recipe.schema import ExportSettings

if TYPE_CHECKING:
    from draftsmith.export.manifest import DraftRecord, ExportManifest

TRTLLM_FILE = "trtllm/extra_llm_api_options.yaml"
VLLM_FILE = "vllm/speculative_config.json"


def trtllm_options(*, algorithm: DraftAlgorithm, draft_dir: Path, settings: ExportSettings, draft: DraftRecord,
                   kv_cache_fp8: bool) -> dict[str, Any]:
    """The YAML `trtllm-serve MODEL --extra_llm_api_options FILE` (newer releases also `--config`) reads.

    The speculative keys are the algorithm's (portable spellings; release-specific keys such as
    `eagle3_one_model` are left out because a removed key fails start-up).
    """
    trt = settings.trtllm
    options: dict[str, Any] = {
        "max_batch_size": trt.max_batch_size,
        "max_num_tokens": trt.max_num_tokens,
        "kv_cache_config": {"free_gpu_memory_fraction": trt.kv_cache_free_gpu_memory_fraction,
                            "enable_block_reuse": True},
        "scheduler_config": {"capacity_scheduler_policy": trt.capacity_scheduler_policy},
        "cuda_graph_config": ({"enable_padding": True, "max_batch_size": trt.cuda_graph_max_batch_size}
                              if trt.cuda_graph_max_batch_size else None),  # on unless null
        "speculative_config": algorithm.trtllm_speculative(draft_dir, settings, draft),
    }
    if kv_cache_fp8:
        options["kv_cache_config"]["dtype"] = "fp8"
    options.update(trt.extra)
    check_trtllm_options(options)
    return options


def vllm_runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as handed to a vLLM engine on this machine.

    vLLM 0.32 overrides an explicit `method` with "eagle3" (or "eagle") whenever the draft's path contains that
    word, so a Medusa draft exported under, say, runs/tiny-eagle3/ would be loaded as an EAGLE-3 head. Such a path
    is reached through a neutrally named symlink instead.
    """
    path = str(config["model"])
    if config["method"] in ("eagle", "eagle3") or "eagle" not in path.lower():
        return config
    link_dir = Path(tempfile.mkdtemp(prefix="draftsmith-draft-"))
    link = link_dir / f"{config['method']}-draft"
    link.symlink_to(Path(path).resolve(), target_is_directory=True)
    return {**config, "model": str(link)}


def write_engine_configs(export_dir: Path, manifest: ExportManifest, settings: ExportSettings) -> dict[str, str]:
    """Write the configs the manifest's targets call for, with paths under `export_dir`; returns their files."""
    files: dict[str, str] = {}
    for target in settings.targets:
        config = engine_config(export_dir, manifest, target, settings=settings)
        if config is None:
            continue
        path = export_dir / (TRTLLM_FILE if target == "trtllm" else VLLM_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        if target == "trtllm":
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        else:
            path.write_text(json.dumps(config, indent=2))
        files[target] = str(path.relative_to(export_dir))
    return files


def engine_config(export_dir: Path, manifest: ExportManifest, target: str, *, settings: ExportSettings,
                  device: str = "gpu") -> dict[str, Any] | None:
    """The engine config of `target` for the export in `export_dir` (vLLM: the GPU or the CPU draft variant).

    None when the target cannot load this algorithm's export (`unsupported_reason`).
    """
    export_dir = Path(export_dir).resolve()
    variants, algorithm = manifest.draft.variants, get_algorithm(manifest.algorithm)
    if algorithm.unsupported_reason(target) is not None:
        return None
    if target == "trtllm":
        return trtllm_options(algorithm=algorithm, draft_dir=export_dir / variants["trtllm"], settings=settings,
                              draft=manifest.draft,
                              kv_cache_fp8=manifest.quantization is not None and manifest.quantization.kv_cache)
    variant = variants.get("vllm_cpu" if device == "cpu" else "vllm")
    if variant is None:
        return None
    return algorithm.vllm_speculative(export_dir / variant, settings.max_draft_len)


def relocated_engine_config(export_dir: Path, manifest: ExportManifest, target: str, device: str = "gpu"
                            ) -> dict[str, Any] | None:
    """The config written at export time, its draft path pointed at where the export is now (a copy, a registry
    download). Reads the written file rather than re-deriving it, so an export outlives schema changes."""
    export_dir = Path(export_dir).resolve()
    written = manifest.engine_configs.get(target)
    if written is None:
        return None
    variants = manifest.draft.variants
    if target == "trtllm":
        config = yaml.safe_load((export_dir / written).read_text())
        config["speculative_config"]["speculative_model_dir"] = str(export_dir / variants["trtllm"])
        return config
    config = json.loads((export_dir / written).read_text())
    config["model"] = str(export_dir / variants["vllm_cpu" if device == "cpu" else "vllm"])
    return config


def relocate_engine_configs(export_dir: Path, manifest: ExportManifest) -> None:
    """Rewrite the written engine configs for the export's current folder."""
    for target, written in manifest.engine_configs.items():
        config = relocated_engine_config(export_dir, manifest, target)
        path = Path(export_dir) / written
        path.write_text(yaml.safe_dump(config, sort_keys=False) if target == "trtllm" else json.dumps(config, indent=2))
