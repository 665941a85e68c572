"""Prometheus metrics for `/metrics`: request latency per route, queue depths, tokens trained and sampled.

One registry per application (so several apps in one process, as in tests, do not collide).
Knows nothing about what the requests do; routes and the scheduler report into it.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "tinkerd_request_seconds", "HTTP request duration", ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.engine_seconds = Histogram(
            "tinkerd_engine_job_seconds", "Engine job duration", ["kind"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens_trained = Counter("tinkerd_tokens_trained_total", "Tokens through forward/backward",
                                      registry=self.registry)
        self.tokens_sampled = Counter("tinkerd_tokens_sampled_total", "Tokens sampled", registry=self.registry)
        self.training_queue = Gauge("tinkerd_training_queue_depth", "Training jobs queued for the engine",
                                    registry=self.registry)
        self.sampling_requests = Gauge("tinkerd_sampling_requests", "Sampling requests in flight",
                                       registry=self.registry)

        self.online = {what: Gauge(f"tinkerd_online_{what}", help, registry=self.registry) for what, help in (
            ("models", "Online models"), ("updates", "Updates the online models made, in total"),
            ("feedback_stored", "Feedback stored for online models"),
            ("feedback_learned", "Feedback an update of its online model has trained on"))}

    def set_online(self, totals: dict[str, int]) -> None:
        """Read from the Store when /metrics is scraped (`Store.online_totals`)."""
        for what, value in totals.items():
            self.online[what].set(value)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
