"""vLLM's own metrics, read in the process that runs its engine (offline LLM or a Serve replica's AsyncLLM)."""

from __future__ import annotations

from typing import Any

# Gauges reported beside the speculative counters: how busy the engine is.
QUEUE_GAUGES = {"vllm:num_requests_running": "requests_running", "vllm:num_requests_waiting": "requests_waiting"}


def spec_decode_counters(metrics: list) -> dict[str, Any]:
    """vLLM's cumulative speculative-decoding counters (summed over engines) from a metrics snapshot."""
    from vllm.v1.metrics.reader import Counter, Vector

    counters: dict[str, Any] = {}
    for metric in metrics:
        if metric.name.startswith("vllm:spec_decode"):
            key = metric.name.removeprefix("vllm:spec_decode_")
            if isinstance(metric, Counter):
                counters[key] = counters.get(key, 0) + metric.value
            elif isinstance(metric, Vector):
                previous = counters.get(key, [0] * len(metric.values))
                counters[key] = [a + b for a, b in zip(previous, metric.values, strict=True)]
    return counters


def spec_decode_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The counters between two snapshots; mean acceptance length = 1 + accepted / drafts (tokens per step)."""
    delta: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, list):
            previous = before.get(key, [0] * len(value))
            delta[key] = [a - b for a, b in zip(value, previous, strict=True)]
        else:
            delta[key] = value - before.get(key, 0)
    drafts = delta.get("num_drafts", 0)
    delta["acceptance_length"] = 1 + delta.get("num_accepted_tokens", 0) / drafts if drafts else None
    return delta


def engine_stats_snapshot() -> dict[str, Any]:
    """Speculative counters (cumulative, with acceptance length), queue gauges, finished requests by reason and
    generated tokens of the engines in this process.

    Needs vLLM's Prometheus stat logger (engine arg `disable_log_stats=False`).
    """
    from vllm.v1.metrics.reader import Counter, Gauge, get_metrics_snapshot

    metrics = get_metrics_snapshot()
    stats: dict[str, Any] = {"spec_decode": spec_decode_delta({}, spec_decode_counters(metrics)),
                             "requests_finished": {}, "generation_tokens": 0}
    for metric in metrics:
        if isinstance(metric, Gauge) and metric.name in QUEUE_GAUGES:
            key = QUEUE_GAUGES[metric.name]
            stats[key] = stats.get(key, 0) + metric.value
        elif isinstance(metric, Counter) and metric.name == "vllm:request_success":
            reason = metric.labels.get("finished_reason", "unknown")
            stats["requests_finished"][reason] = stats["requests_finished"].get(reason, 0) + metric.value
        elif isinstance(metric, Counter) and metric.name == "vllm:generation_tokens":
            stats["generation_tokens"] += metric.value
    return stats
