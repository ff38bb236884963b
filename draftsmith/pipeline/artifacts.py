"""What each stage hands the next: one frozen, typed model per stage, stored in the stage's `_DONE.json`.

A stage returns its artifact from `run`; downstream stages read attributes (`ctx.input("base", BaseArtifact)
.model_dir`), so a renamed field fails when the code is loaded or the marker is read, not hours into a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Read-only, and an unknown field is an error (an older or newer layout is never half-read)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Artifact(Frozen):
    """The outputs of one finished stage."""


class BaseArtifact(Artifact):
    """Stage `base`: the frozen base model's folder."""

    model_dir: Path = Field(description="The base model's Hugging Face folder.")
    model_hash: str = Field(description="Fingerprint of the folder's content.")
    embedded: bool = Field(description="Whether it is the embedded base built from the recipe.")


class PromptSource(Frozen):
    """One prompt file synthesis reads."""

    path: Path
    format: Literal["auto", "openai", "sharegpt", "mtbench"]


class PromptsArtifact(Artifact):
    """Stage `prompts`: the conversations synthesis answers and the held-out prompts evaluation uses."""

    sources: list[PromptSource]
    heldout: Path | None = Field(description="Held-out prompts (jsonl), if the recipe has any.")
    generated: bool = Field(description="Whether any prompts were written by this stage (embedded or self-generated).")


class SynthesisArtifact(Artifact):
    """Stage `synthesize`: the base's answers, as conversation shards."""

    conversations: list[Path] = Field(description="The conversation shards (OpenAI chat jsonl).")
    output_dir: Path
    written: int
    quarantined: int
    read: int


class DatasetArtifact(Artifact):
    """Stage `dataset`: the tokenized train and validation splits (`prepare_training_data`'s summary)."""

    data_dir: Path
    files: int
    conversations: int
    usable: int
    quarantined: int
    bad_share: float
    train: int = Field(description="Conversations in the train split.")
    validation: int = Field(description="Conversations in the validation split.")
    truncated: int
    tokens: int
    target_tokens: int
    distinct_target_tokens: int


class ConvertArtifact(Artifact):
    """Stage `convert`: the untrained draft checkpoint and its vocabulary mapping's report."""

    draft_dir: Path = Field(description="The draft checkpoint (ModelOpt state + draft tensors + meta).")
    algorithm: str
    draft_parameters: int
    base_parameters: int
    draft_vocab_size: int
    base_vocab_size: int
    # Only with a reduced draft vocabulary (`draft_vocabulary`'s report):
    distinct_target_tokens: int | None = None
    target_token_coverage: float | None = Field(None, description="Share of target tokens the draft can predict.")


class FeatureStoreFigures(Frozen):
    """What a feature store holds and what computing it cost (its `features.json`, and the features stage's
    artifact)."""

    aux_layer_ids: list[int]
    hidden_size: int
    dtype: str = Field(description="Storage dtype of the features.")
    compute_dtype: str
    parts: int
    tokens: int
    bytes: int  # on disk
    bytes_per_token: float
    bytes_per_token_bfloat16: int
    bytes_per_token_float32: int
    compute_seconds: float
    wall_seconds: float


class FeaturesArtifact(Artifact, FeatureStoreFigures):
    """Stage `features`: the stored base states (the store's manifest, less its format tag)."""

    features_dir: Path


class TrainArtifact(Artifact):
    """Stage `train`: the trained draft checkpoint and its final metrics."""

    draft_dir: Path
    steps: int
    resumed_from: list[int] = Field(description="Steps at which the run was resumed, if any.")
    metrics: dict[str, float] = Field(description="The last logged train/ and val/ metrics.")
    base_features: Literal["online", "offline"]


class QuantizationInfo(Frozen):
    """How a draft was quantized (also in its checkpoint's meta)."""

    format: str
    kv_cache: bool
    base: bool = Field(description="Whether the base was quantized too.")
    calibration_samples: int


class QuantizeArtifact(Artifact):
    """Stage `quantize`: the fake-quantized draft (or the trained one as it is, with no quantization)."""

    draft_dir: Path
    quantized_base_dir: Path | None
    quantization: QuantizationInfo | None = Field(description="None: `quantization.format: none`.")
    quantizers: dict[str, int] | None = Field(None, description="Enabled quantizers on the draft and the base.")
    validation: dict[str, dict[str, float]] | None = Field(None, description="Validation metrics, bf16 and PTQ.")


class QatArtifact(Artifact):
    """Stage `qat`: the QAT-finetuned draft (or the quantize stage's, when there is nothing to finetune)."""

    draft_dir: Path
    steps: int
    report: dict[str, dict[str, float]] | None = Field(description="Validation of bf16, PTQ and QAT; None: no QAT.")


class RoundTripSample(Frozen):
    """One prompt of the round trip and the base's greedy answer to it."""

    messages: list[dict[str, str]]
    text: str


class RoundTrip(Frozen):
    """The greedy round trip of an export through vLLM: the base with and without the draft, token for token."""

    prompts: int
    identical: bool
    mismatched_prompts: list[int]
    output_tokens: int
    acceptance_length: float | None
    num_drafts: int
    num_accepted_tokens: int
    accepted_per_position: list[int] | None
    tokens_per_s: dict[str, float] = Field(description="'base' and 'with_draft' output tokens/s.")
    samples: list[RoundTripSample] = Field(description="What the base answered, greedy: a reference any engine "
                                                       "serving this export must reproduce.")


def read_record(path: Path, kind: type[M], expected_format: str, error: type[Exception], fix: str) -> M:
    """The JSON file `path` as `kind`, whose `format` must be `expected_format`; `error` (one line: the file, the
    key, and `fix`) when it is not JSON, of another format, or misses or adds a key."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc}); {fix}") from None
    found = record.get("format") if isinstance(record, dict) else type(record).__name__
    if found != expected_format:
        raise error(f"{path}: format {found!r}, expected {expected_format!r}; {fix}")
    try:
        return kind.model_validate(record)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "(top level)"
        raise error(f"{path}: key {where!r}: {problem['msg']} (written by another version of draftsmith?); "
                    f"{fix}") from None


def _not_run(value: Any) -> Any:
    # Written before the round trip was typed: `{"skipped": True}` or `{}` meant it did not run.
    return None if value == {} or value == {"skipped": True} else value


MaybeRoundTrip = Annotated[RoundTrip | None, BeforeValidator(_not_run)]


class ExportArtifact(Artifact):
    """Stage `export`: the export folder and what its manifest says about it."""

    export_dir: Path
    algorithm: str
    variants: dict[str, str] = Field(description="Draft variant name -> folder within the export.")
    engine_configs: dict[str, str] = Field(description="Runtime -> its config file within the export.")
    verification: MaybeRoundTrip = Field(description="The greedy round trip through vLLM; None when not run.")


class EvaluationArtifact(Artifact):
    """Stage `evaluate`: the evaluation report and its headline figures."""

    report: Path = Field(description="evaluation.json")
    markdown: Path = Field(description="evaluation.md")
    acceptance_length: dict[str, float | None] = Field(description="'SET@t=TEMP' -> the draft's acceptance length.")
    greedy_identical: bool


class GateOutcome(Frozen):
    """The promotion gate's decision."""

    promoted: bool
    reason: str
    champion_version: str | None


class RegistrationArtifact(Artifact):
    """Stage `register`: the registered model version."""

    name: str
    version: str
    model_uri: str
    alias: str | None
    reused: bool = Field(description="Whether the export was registered already and that version was found.")
    gate: GateOutcome | None = Field(None, description="None: the recipe has no promotion gate.")
