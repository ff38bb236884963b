"""The Ray Serve application: an OpenAI-compatible ingress in front of a speculative engine (vLLM or TensorRT-LLM).

`serve/config.yaml` is what `serve deploy` (or `python -m jobs.deploy`) takes; `serve.app:build_app` builds the
application from its `args` (draftsmith.recipe.schema.ServingSettings).
"""
