"""Builds the Serve application from ServingSettings: `import_path: serve.app:build_app` with them as `args`.

    ingress (DraftsmithIngress, OpenAI routes)  ->  engine deployment (vLLM LLMServer | TensorRT-LLM)
                         \\-> EngineStatsBoard <-/  (engine replicas report acceptance, queue depth)

The ingress and the board import no engine; the engine deployment's class (and so its engine) is imported here,
in the build, and in its replicas.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.model_source import default_model_id, replica_env
from serve.ingress import DraftsmithIngress
from serve.stats_board import EngineStatsBoard

log = logging.getLogger(__name__)

INGRESS_NAME, BOARD_NAME = "DraftsmithIngress", "EngineStatsBoard"
# Rollouts (a new champion) start replacements first (max_surge_percent), then drain old replicas' requests.
GRACEFUL_SHUTDOWN_S = 120


def scaling_options(settings: ServingSettings) -> dict[str, Any]:
    if settings.autoscaling is None:
        return {"num_replicas": settings.replicas}
    return {"autoscaling_config": settings.autoscaling.model_dump()}


def engine_deployment(settings: ServingSettings, model_id: str, board: Application) -> Application:
    serving = settings.model_dump(mode="json")
    runtime_env = {"env_vars": replica_env(settings)}
    common = {**scaling_options(settings), "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
              "health_check_period_s": 5, "health_check_timeout_s": 30,
              "max_surge_percent": settings.max_surge_percent}
    if settings.engine == "trtllm":
        from serve.trtllm_server import TRTLLMServer

        return serve.deployment(TRTLLMServer, name=f"TRTLLMServer:{model_id}", ray_actor_options={
            "num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus, "runtime_env": runtime_env},
            **common).bind(serving=serving, stats_board=board)

    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    from serve.vllm_server import SpeculativeVLLMServer

    bundle = {"CPU": settings.replica_cpus, **({"GPU": settings.replica_gpus} if settings.replica_gpus else {})}
    llm_config = LLMConfig(
        # The model source is resolved on the replica (SpeculativeVLLMServer downloads the pinned version).
        model_loading_config={"model_id": model_id, "model_source": settings.model_ref},
        runtime_env=runtime_env, placement_group_config={"bundles": [bundle]},
        deployment_config={**common, "ray_actor_options": {"num_cpus": 0}},
        log_engine_metrics=False,  # vLLM's own Prometheus logger instead: the replica reads its counters
    )
    return build_llm_deployment(llm_config, deployment_cls=SpeculativeVLLMServer,
                                bind_kwargs={"serving": serving, "stats_board": board})


def build_app(args: dict[str, Any]) -> Application:
    """The application for `args` (ServingSettings); unknown or invalid keys fail here, naming the key."""
    settings = ServingSettings.model_validate(args)
    model_id = default_model_id(settings)
    board = serve.deployment(EngineStatsBoard, name=BOARD_NAME, num_replicas=1, max_surge_percent=100,
                             ray_actor_options={"num_cpus": 0}).bind()
    engine = engine_deployment(settings, model_id, board)
    return serve.deployment(DraftsmithIngress, name=INGRESS_NAME, num_replicas=settings.ingress_replicas,
                            max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, max_surge_percent=100).bind(
        engines={model_id: engine}, serving=settings.model_dump(mode="json"), stats_board=board)
