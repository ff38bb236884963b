"""The endpoint's Prometheus metrics: what the ingress sees of each request, and what the engines report.

Request metrics (requests, errors, tokens, time to first token, inter-token latency, latency) are counted by the
ingress replica that served the request. Engine metrics (speculative acceptance, queue depth) come from the
engine replicas' latest reports on the stats board, rendered per replica and summed per model at scrape time.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class EngineCollector:
    """Renders the stats board's latest per-replica engine reports."""

    def __init__(self):
        self.reports: dict[str, dict[str, Any]] = {}

    def collect(self):
        acceptance = GaugeMetricFamily("draftsmith_spec_decode_acceptance_length",
                                       "Mean tokens per verification step (1 + accepted / drafts), per model",
                                       labels=["model", "model_version"])
        per_position = GaugeMetricFamily("draftsmith_spec_decode_acceptance_rate",
                                         "Share of drafts whose token at this position was accepted",
                                         labels=["model", "position"])
        drafts = CounterMetricFamily("draftsmith_spec_decode_drafts", "Verification steps with a draft",
                                     labels=["model", "replica"])
        drafted = CounterMetricFamily("draftsmith_spec_decode_draft_tokens", "Draft tokens proposed",
                                      labels=["model", "replica"])
        accepted = CounterMetricFamily("draftsmith_spec_decode_accepted_tokens", "Draft tokens accepted",
                                       labels=["model", "replica"])
        running = GaugeMetricFamily("draftsmith_engine_requests_running", "Requests the engine is running",
                                    labels=["model", "replica"])
        waiting = GaugeMetricFamily("draftsmith_engine_requests_waiting", "Requests queued in the engine",
                                    labels=["model", "replica"])
        finished = CounterMetricFamily("draftsmith_engine_requests_finished", "Requests the engine finished, by "
                                       "reason", labels=["model", "replica", "reason"])
        generated = CounterMetricFamily("draftsmith_engine_generation_tokens", "Tokens the engine generated "
                                        "(including requests whose client went away)", labels=["model", "replica"])
        for (model, version), summed in sum_by_model(self.reports).items():
            if summed["num_drafts"]:
                acceptance.add_metric([model, version or ""], 1 + summed["num_accepted_tokens"] / summed["num_drafts"])
                for position, count in enumerate(summed["num_accepted_tokens_per_pos"], start=1):
                    per_position.add_metric([model, str(position)], count / summed["num_drafts"])
        for replica, report in self.reports.items():
            labels, spec = [report["model"], replica], report.get("spec_decode") or {}
            drafts.add_metric(labels, spec.get("num_drafts", 0))
            drafted.add_metric(labels, spec.get("num_draft_tokens", 0))
            accepted.add_metric(labels, spec.get("num_accepted_tokens", 0))
            running.add_metric(labels, report.get("requests_running", 0))
            waiting.add_metric(labels, report.get("requests_waiting", 0))
            generated.add_metric(labels, report.get("generation_tokens", 0))
            for reason, count in (report.get("requests_finished") or {}).items():
                finished.add_metric([*labels, reason.lower()], count)
        yield from (acceptance, per_position, drafts, drafted, accepted, running, waiting, finished, generated)


def sum_by_model(reports: dict[str, dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, Any]]:
    sums: dict[tuple[str, str | None], dict[str, Any]] = {}
    for report in reports.values():
        spec = report.get("spec_decode") or {}
        total = sums.setdefault((report["model"], report.get("model_version")),
                                {"num_drafts": 0, "num_accepted_tokens": 0, "num_accepted_tokens_per_pos": []})
        total["num_drafts"] += spec.get("num_drafts", 0)
        total["num_accepted_tokens"] += spec.get("num_accepted_tokens", 0)
        per_position = total["num_accepted_tokens_per_pos"]
        for position, count in enumerate(spec.get("num_accepted_tokens_per_pos") or []):
            if position == len(per_position):
                per_position.append(0)
            per_position[position] += count
    return sums


class ServeMetrics:
    """One ingress replica's registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("draftsmith_requests", "Requests answered, by route and HTTP status",
                                ["model", "route", "status"], registry=r)
        self.errors = Counter("draftsmith_request_errors", "Requests answered with an error, by error type",
                              ["model", "route", "type"], registry=r)
        self.prompt_tokens = Counter("draftsmith_prompt_tokens", "Prompt tokens of answered requests", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("draftsmith_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("draftsmith_time_to_first_token_seconds", "Request arrival to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("draftsmith_inter_token_latency_seconds", "Mean time per generated token after the "
                             "first, per request", ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("draftsmith_request_latency_seconds", "Request arrival to last byte",
                                 ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.engines = EngineCollector()
        r.register(self.engines)

    def record_error(self, model: str, route: str, status: int, error_type: str) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.errors.labels(model, route, error_type).inc()

    def record_success(self, model: str, route: str, *, seconds: float, ttft: float | None, prompt_tokens: int,
                       completion_tokens: int, streamed_until_last: float | None = None) -> None:
        self.requests.labels(model, route, "200").inc()
        self.latency.labels(model, route).observe(seconds)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if streamed_until_last is not None and completion_tokens > 1:
                self.itl.labels(model).observe((streamed_until_last - ttft) / (completion_tokens - 1))

    def render(self, engine_reports: dict[str, dict[str, Any]]) -> bytes:
        self.engines.reports = engine_reports
        return generate_latest(self.registry)
