"""Load test of the Serve endpoint: the recipe's export served with its draft and without it (the base alone),
side by side in one Serve instance, under 1, 4 and 16 concurrent streaming clients from a second process."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from draftsmith.bench.report import Section
from draftsmith.pipeline.artifacts import BaseArtifact, ExportArtifact
from draftsmith.pipeline.stage import output_of
from draftsmith.recipe.loader import load_recipe
from draftsmith.stages.run import run_recipe

log = logging.getLogger(__name__)

LEVELS = (1, 4, 16)
MAX_TOKENS = 128
DEADLINE_S = 300  # per load run; requests still queued then are not sent
CONFIGS = {"with-draft": True, "without-draft": False}


def requests_for(concurrency: int) -> int:
    return max(8, 4 * concurrency)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _prompts(base_dir: Path, out: Path) -> Path:
    from draftsmith.embedded.build import HELDOUT_FILE

    prompts = []
    for line in (base_dir / HELDOUT_FILE).read_text().splitlines():
        messages = json.loads(line).get("messages") or []
        first = next((m["content"] for m in messages if m.get("role") == "user"), None)
        if first:
            prompts.append(first)
    path = out / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


def load_run(url: str, model: str, prompts: Path, concurrency: int) -> dict:
    cmd = [sys.executable, "-m", "draftsmith.bench.load_client", "--url", url, "--model", model, "--prompts",
           str(prompts), "--concurrency", str(concurrency), "--requests", str(requests_for(concurrency)),
           "--max-tokens", str(MAX_TOKENS), "--deadline", str(DEADLINE_S)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serving_section(recipe_name: str, overrides: list[str]) -> Section:
    import ray
    from ray import serve

    from draftsmith import cluster
    from serve.app import build_app

    recipe = load_recipe(recipe_name, overrides)
    results = run_recipe(recipe, until="export")  # done by the speculation benchmarks: found, not rerun
    export_dir = output_of(results, "export", ExportArtifact).export_dir
    work = Path(tempfile.mkdtemp(prefix="draftsmith-bench-serve-"))
    prompts = _prompts(output_of(results, "base", BaseArtifact).model_dir, work)
    port = _free_port()
    cluster.connect(recipe.ray)
    table = Section(f"Serving (Ray Serve + vLLM CPU): {MAX_TOKENS}-token streamed chat answers, greedy, "
                    "with and without the draft", ["configuration", "clients", "requests", "errors", "requests/s",
                                                   "output tokens/s", "vs without draft", "TTFT p50 ms",
                                                   "TTFT p99 ms", "latency p50 s", "latency p99 s"])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, speculative in CONFIGS.items():
            args = {"model_ref": str(export_dir), "model_id": name, "speculative": speculative, "api_key_env": None,
                    "max_tokens_limit": MAX_TOKENS}
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        measured: dict[tuple[str, int], dict] = {}
        for concurrency in LEVELS:  # the two configurations alternate, so drift hits both alike
            for name in CONFIGS:
                log.info("load test: %s, %d clients", name, concurrency)
                measured[(name, concurrency)] = load_run(f"http://127.0.0.1:{port}/{name}", name, prompts,
                                                         concurrency)
    finally:
        serve.shutdown()
        ray.shutdown()
    for name in CONFIGS:
        for concurrency in LEVELS:
            r, base = measured[(name, concurrency)], measured[("without-draft", concurrency)]
            ttft, latency = r["ttft_s"], r["latency_s"]
            table.add(name, concurrency, r["requests"], r["errors"], r["requests_per_s"], r["output_tokens_per_s"],
                      r["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else "-",
                      _ms(_percentile(ttft, 50)), _ms(_percentile(ttft, 99)), _percentile(latency, 50) or "-",
                      _percentile(latency, 99) or "-")
    errors = sum(r["errors"] for r in measured.values())
    table.notes.append(
        f"Both configurations serve the same export ({export_dir.parent.name}) from one Serve instance, one "
        "engine replica each; a second process drives N clients, each sending its next request when the last "
        f"finished, {', '.join(f'{requests_for(c)}' for c in LEVELS)} requests at {', '.join(map(str, LEVELS))} "
        f"clients; prompts are the base's held-out first turns. Errors in all runs: {errors} (must be 0). The "
        "1M-parameter CPU base makes a draft step cost about as much as a verification step, so the draft's "
        "token-rate gain is small here; the acceptance length is in the evaluation table.")
    return table


def _ms(seconds: float | None):
    return "-" if seconds is None else seconds * 1000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
