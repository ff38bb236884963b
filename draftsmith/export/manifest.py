"""An export's `manifest.json` as one typed model: what the folder holds, where it came from, the checks it passed.

Everything that reads an export (the engine configs, evaluation, the registry, Serve replicas) reads it through
`read_manifest`, so a manifest from another layout fails once, at the door, naming the key, instead of as a
`KeyError` inside a replica.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from draftsmith.pipeline.artifacts import MaybeRoundTrip, QuantizationInfo, read_record

MANIFEST = "manifest.json"
FORMAT = "draftsmith-export/1"


class ManifestError(ValueError):
    """A folder is not a draftsmith export, or its manifest is from another layout; the message says which key."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelRecord(_Record):
    """The base the draft was trained against, where it was at export time."""

    dir: Path
    hash: str


class DraftRecord(_Record):
    """The exported draft: its variants, the checkpoint it came from and what its tensors were checked for."""

    variants: dict[str, str] = Field(description="Variant (trtllm, vllm, vllm_cpu) -> folder within the export.")
    checkpoint_digest: str = Field(description="Of the checkpoint's tensors: which draft this is an export of.")
    aux_layer_ids: list[int] | None = Field(description="The base layers the draft reads, as the first variant "
                                                        "numbers them; None where the algorithm reads none.")
    checks: dict[str, dict[str, Any]] = Field(description="Variant -> its algorithm's tensor check report.")
    draft_vocab_size: int | None
    medusa_heads: int | None
    block_size: int | None
    trained_steps: int
    training_run_id: str | None


class ExportManifest(_Record):
    """`manifest.json`."""

    format: Literal["draftsmith-export/1"] = FORMAT
    algorithm: str
    quantization: QuantizationInfo | None = Field(description="None: a bf16 draft.")
    base_model: BaseModelRecord
    quantized_base: str | None = Field(description="Folder of the quantized base within the export, if any.")
    draft: DraftRecord
    # As written, not as today's ExportSettings: an export outlives schema changes (its engine configs are read
    # from the files written beside it, never re-derived from these).
    export_settings: dict[str, Any]
    export_digest: str = Field(description="Of the checkpoint, the export settings and the quantized base.")
    engine_configs: dict[str, str] = Field(default_factory=dict, description="Runtime -> config file within it.")
    engines_without_config: dict[str, str] = Field(default_factory=dict, description="Runtime -> why none.")
    verification: MaybeRoundTrip = Field(None, description="The greedy round trip through vLLM; None: not run.")

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, name: str) -> str:
        from draftsmith.draft.algorithms import get_algorithm

        get_algorithm(name)  # an unknown one lists the registered ones
        return name

    @property
    def quantization_format(self) -> str:
        return self.quantization.format if self.quantization is not None else "bf16"

    @property
    def max_draft_len(self) -> int | None:
        return self.export_settings.get("max_draft_len")

    def write(self, export_dir: Path) -> None:
        (Path(export_dir) / MANIFEST).write_text(json.dumps(self.model_dump(mode="json"), indent=2))


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """The manifest of the export in `export_dir`; ManifestError (one line, the key named) for anything else."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{export_dir} is not a draftsmith export ({MANIFEST} is missing)")
    return read_record(path, ExportManifest, FORMAT, ManifestError, "re-export the draft with this version")
