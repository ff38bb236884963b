"""The one interface every draft algorithm implements: everything the pipeline asks of "the algorithm".

A stage never branches on an algorithm's name; it asks the algorithm object (`get_algorithm(name)`) how the draft
is sized and checked against the base, converted with ModelOpt, trained (the objective and its per-step
accuracies), exported and checked, and which runtime configs it produces, or why a runtime cannot run it. The
shape follows vLLM's proposer seam and SpecForge's algorithm specs: a small stateless object per algorithm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from draftsmith.draft.checkpoint import DraftMeta, LoadedDraft
    from draftsmith.export.manifest import DraftRecord
    from draftsmith.recipe.schema import DraftSettings, ExportSettings


class DraftConfigError(ValueError):
    """The recipe's draft does not fit the base model; the message names the key and how to fix it."""


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm supports; the recipe and the stages check these instead of names."""

    draft_vocabulary: bool  # a reduced output vocabulary mapped back to the base's ids (d2t)
    aux_layers: bool  # fuses several of the base's layers
    offline_features: bool  # trains from stored base states (the features stage)
    quantization: bool = True  # PTQ/QAT of the draft


@dataclass(frozen=True)
class ExportedDraft:
    """What an algorithm's export wrote: variant name -> folder under the export (trtllm, vllm, vllm_cpu)."""

    variants: dict[str, str]
    quantization: dict[str, Any] | None


def text_config(config: Any) -> Any:
    """The language model's config (the text part of multimodal configs)."""
    return getattr(config, "text_config", None) or getattr(config, "llm_config", None) or config


def check_decoder(cfg: Any) -> None:
    """ModelOpt's speculative modules attach to decoder-only transformers with these keys."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not getattr(cfg, key, None):
            raise DraftConfigError(
                f"the base config ({getattr(cfg, 'model_type', '?')}) has no {key}: ModelOpt's speculative "
                "modules attach to decoder-only transformers (Llama, Qwen, Mistral families)"
            )


class DraftAlgorithm(ABC):
    """One draft algorithm. Subclasses set the class attributes and implement the abstract methods."""

    name: str = ""
    description: str = ""
    prefix: str = ""  # where the draft's trainable tensors live in the converted model
    settings_section: str = ""  # its section of the recipe's `draft` (the others do not change its draft)
    capabilities: Capabilities
    # Bumped when the training objective is corrected after drafts were trained with it; the train stage puts it
    # into its fingerprint (None keeps the finished runs of algorithms whose objective never changed).
    objective_revision: int | None = None
    # Bumped when the converted draft's layout changes (the convert stage's fingerprint, likewise).
    layout_revision: int | None = None

    # ---------------------------------------------------------------------------------------- sizing, convert
    @abstractmethod
    def check_fits(self, settings: DraftSettings, base_config: Any) -> None:
        """Raise DraftConfigError (naming the recipe key) when this draft cannot attach to the base."""

    @abstractmethod
    def convert_spec(self, settings: DraftSettings, base_config: Any, *, dtype: str = "float32"
                     ) -> list[tuple[str, dict]]:
        """The `mtsp.convert` mode list (checks fit first)."""

    def prepare(self, model: torch.nn.Module) -> None:
        """Adjust the converted model where ModelOpt's layout differs from the runtimes' (after every convert and
        every restore from a checkpoint)."""
        return None

    def meta(self, settings: DraftSettings) -> dict[str, Any]:
        """The algorithm's own fields of a checkpoint's `draft_meta.json` (sizes the later stages read)."""
        return {}

    def feature_layers(self, settings: DraftSettings, num_layers: int) -> tuple[int, ...]:
        """The base layers whose outputs an offline feature store keeps besides the final hidden state."""
        raise DraftConfigError(f"draft.algorithm={self.name} does not train from stored base features; use "
                               "training.base_features=online")

    def model_feature_layers(self, model: torch.nn.Module) -> tuple[int, ...]:
        """`feature_layers` as a converted model records them (to check a feature store against a checkpoint)."""
        raise DraftConfigError(f"draft.algorithm={self.name} does not train from stored base features")

    # ---------------------------------------------------------------------------------------------- training
    @abstractmethod
    def num_accuracies(self, meta: DraftMeta) -> int:
        """How many per-step (or per-head) accuracies `forward` reports for a checkpoint with this meta."""

    @abstractmethod
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        """(loss, accuracies) of one micro batch; `model` may be a DeepSpeed engine."""

    # ------------------------------------------------------------------------------------------------ export
    @abstractmethod
    def export(self, loaded: LoadedDraft, out_dir: Path, *, dtype: torch.dtype) -> ExportedDraft:
        """Write the runtimes' draft folders under `out_dir`."""

    @abstractmethod
    def check_export(self, out_dir: Path, exported: ExportedDraft, meta: DraftMeta, base_config: Any
                     ) -> dict[str, dict[str, Any]]:
        """Check every variant's tensors against what its runtime reads; per variant, a description."""

    def unsupported_reason(self, runtime: str) -> str | None:
        """Why `runtime` cannot serve this algorithm's export, or None when it can."""
        return None

    @abstractmethod
    def trtllm_speculative(self, draft_dir: Path, settings: ExportSettings, draft: DraftRecord
                           ) -> dict[str, Any]:
        """TensorRT-LLM's `speculative_config` (only called when `unsupported_reason("trtllm")` is None)."""

    @abstractmethod
    def vllm_speculative(self, draft_dir: Path, num_speculative_tokens: int) -> dict[str, Any]:
        """vLLM's `speculative_config` (only called when `unsupported_reason("vllm")` is None)."""
