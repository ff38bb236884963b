"""MLflow pyfunc of a registered draft: `predict` generates with vLLM, the base and the exported draft.

Logged as "models from code" through `pyfunc_model.py`, a shim that imports this class from the installed
draftsmith (nothing is pickled, and the registry holds no copy of the package whose code would run at load), so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(pd.DataFrame({"prompt": [...]}))` works in a fresh
process where draftsmith is installed. Artifacts: `export` (the export folder), `recipe`, and `base` (the base model folder vLLM runs the draft beside)
unless the version was registered with `tracking.bundle_base=false`, when the model config's `base_model` path
is used.
On a machine without CUDA it runs vLLM's CPU build with the export's CPU draft variant. vLLM compiles the model
unless the model config says `enforce_eager: true` (at load: `load_model(uri, model_config={"enforce_eager": True})`),
runs its engine core and worker in processes of their own unless it says `in_process: true`, and computes in
`dtype` (default auto: bfloat16 on CPUs with AVX512-BF16 or AMX), as the recipe's `vllm` settings mean them.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("draftsmith")
    except PackageNotFoundError:
        return "unknown"


def _prompts(model_input: Any) -> list[str]:
    if hasattr(model_input, "columns"):  # pandas DataFrame, as the signature asks
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column; it has {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        prompt = model_input["prompt"]
        return [prompt] if isinstance(prompt, str) else list(prompt)
    return [str(p) for p in model_input]


class SpeculativeDraftModel(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from vllm import LLM

        from draftsmith.engines.vllm_args import engine_args, engine_env
        from draftsmith.export.bundle import export_engine_config
        from draftsmith.export.engine_configs import vllm_runtime_config
        from draftsmith.recipe.schema import VllmSettings

        device = "gpu" if torch.cuda.is_available() else "cpu"
        config = context.model_config or {}
        registered_with = config.get("draftsmith_version")
        if registered_with not in (None, installed_version()):
            log.warning("this version was registered with draftsmith %s and is loaded by the installed %s; the "
                        "export's manifest decides whether it can be read", registered_with, installed_version())
        speculative = export_engine_config(context.artifacts["export"], "vllm", device=device)
        if speculative is None:
            raise ValueError("this export has no draft vLLM can load (Medusa exports target TensorRT-LLM)")
        speculative["num_speculative_tokens"] = int(config.get("num_speculative_tokens",
                                                               speculative["num_speculative_tokens"]))
        # `enforce_eager` and `in_process` (the model config's, overridable at load time:
        # `load_model(uri, model_config={...})`); in process: the engine core and worker in this process.
        settings = VllmSettings(enforce_eager=bool(config.get("enforce_eager", False)),
                                in_process=bool(config.get("in_process", False)),
                                dtype=config.get("dtype", "auto"))
        os.environ.update(engine_env(settings))
        kwargs = engine_args(settings, device)
        base = context.artifacts.get("base") or config["base_model"]  # bundled, or a path on shared storage
        self.llm = LLM(model=base, speculative_config=vllm_runtime_config(speculative), seed=0,
                       max_model_len=int(config.get("max_model_len", 1024)), enable_prefix_caching=False, **kwargs)
        # Without an explicit shutdown the engine process keeps the interpreter from exiting; registered after
        # vLLM's own exit handlers, so it runs before them.
        atexit.register(self.close)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from vllm import SamplingParams

        params = params or {}
        sampling = SamplingParams(temperature=float(params.get("temperature", 0.0)),
                                  max_tokens=int(params.get("max_tokens", 64)), seed=0)
        conversations = [[{"role": "user", "content": p}] for p in _prompts(model_input)]
        return [o.outputs[0].text for o in self.llm.chat(conversations, sampling, use_tqdm=False)]

