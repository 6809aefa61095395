"""Prometheus metrics, named after vLLM's with the prefix playground_: what an operator graphs over time.

One registry per app (not prometheus_client's process-wide one), fed by RequestStats for every reply the
chat service streams (UI, gradio_client and /v1 alike) and read live from the engine for the gauges.
No prompt text ever reaches a metric: only counts, times and a finish reason.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets, cut to what a CPU or a single GPU sees.
TTFT_BUCKETS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)
Live = tuple[int, int, tuple | None]  # requests running, requests waiting, (KV in use, KV budget) or None
FINISH_REASONS = {"stop_word": "stop", "eos": "stop", "length": "length"}  # ours -> OpenAI's / vLLM's


class Metrics:
    """Counters and histograms (a RequestObserver), and live gauges once `watch` names their source."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name: Callable[[], str] = lambda: "unknown"
        labels = ("model_name",)
        self.prompt_tokens = Counter(
            "playground_prompt_tokens", "Prompt tokens read.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "playground_generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "playground_request_success",
            "Requests ended, by why: stop, length, abort (cancelled) or error.",
            (*labels, "finished_reason"),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "playground_time_to_first_token_seconds",
            "From arrival to the first token, queueing included.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "playground_inter_token_latency_seconds",
            "Between two tokens of one reply.",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "playground_e2e_request_latency_seconds",
            "From arrival to the end of the reply.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

    def watch(self, model_name: str | Callable[[], str], live: Callable[[], Live]) -> None:
        """Label everything with `model_name` (it follows model switches) and read `live()` when scraped:
        (requests running, requests waiting, (KV tokens in use, KV budget) or None)."""
        self._model_name = model_name if callable(model_name) else lambda: model_name
        self.registry.register(_LiveGauges(self._model_name, live))

    # ---------------------------------------------------------------- what RequestStats reports

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self._model_name()).observe(seconds)

    def tokens(self, count: int, seconds_since_last: float | None) -> None:
        """`count` new tokens arrived together, `seconds_since_last` after the previous ones (None: first)."""
        name = self._model_name()
        self.generation_tokens.labels(name).inc(count)
        if seconds_since_last is not None:
            for _ in range(count):
                self.itl.labels(name).observe(seconds_since_last / count)

    def ended(
        self, outcome: str, finish_reason: str | None, prompt_tokens: int | None, seconds: float
    ) -> None:
        name = self._model_name()
        reason = {"cancelled": "abort", "failed": "error"}.get(outcome) or FINISH_REASONS.get(
            finish_reason, "stop"
        )
        self.request_success.labels(name, reason).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.e2e.labels(name).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveGauges:
    """Gauges read when scraped: requests running and waiting in the engine, and its KV cache in use."""

    def __init__(self, model_name: Callable[[], str], live: Callable[[], Live]):
        self._model_name, self._live = model_name, live

    def describe(self):
        return []  # values only exist when scraped

    def collect(self):
        name = self._model_name()
        running, waiting, kv = self._live()
        for metric, value, text in (
            ("playground_requests_running", running, "Requests decoding now."),
            ("playground_requests_waiting", waiting, "Requests waiting for a place in the batch."),
        ):
            gauge = GaugeMetricFamily(metric, text, labels=["model_name"])
            gauge.add_metric([name], value)
            yield gauge
        if kv is not None and kv[1]:
            used, budget = kv
            gauge = GaugeMetricFamily(
                "playground_kv_cache_usage_perc", "KV cache in use: 1 means full.", labels=["model_name"]
            )
            gauge.add_metric([name], used / budget)
            yield gauge
