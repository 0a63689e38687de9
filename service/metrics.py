"""Prometheus metrics: one ``Metrics`` per server, or the do-nothing ``NoMetrics`` when they are off.

Off by default (``--metrics-port 0``): the server then never imports ``prometheus_client`` (its start time
is benchmarked) and each hook costs one empty method call. On, every family lives in the server's own
``CollectorRegistry``, so tests and several servers in one process never collide.

This module is a leaf: it imports nothing of the server and consumes plain data. The hot path only counts
and observes, with labels its callers set; what the model cache already knows (loaded models, queue
depths, requests in flight, memory, load times) is read as a :class:`~.domain.CacheSnapshot` when
Prometheus scrapes.

Label values come from bounded sets only, and never carry a secret: its callers fold a model name that is
neither a registry entry nor a loaded model to ``other`` (service/labels.py), and a backend name that
clemserve does not know is folded here too.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .domain import CacheSnapshot, Generation, ModelState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

#: the label of a model name that is neither a registry entry nor loaded, and of an unknown backend
OTHER = "other"
#: request latency: a 1 ms echo up to a 10-minute generation
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Snapshot = Callable[[], CacheSnapshot]


class LimiterReading(Protocol):
    """One rate limiter's state (service/backends/rate_limits.py): its name is a configured key entry or
    backend, a bounded set."""

    @property
    def name(self) -> str: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def rate_limited(self) -> int: ...


Readings = Callable[[], Iterable[LimiterReading]]


class MetricsSink(Protocol):
    """What the server reports: plain values, labels set by the caller."""

    enabled: bool

    def request(self, method: str, model: str, backend: str, code: str, seconds: float) -> None: ...
    def queued(self, model: str, seconds: float) -> None: ...
    def batch(self, model: str, rows: int) -> None: ...
    def first_token(self, model: str, seconds: float) -> None: ...
    def spent(self, model: str, generation: Generation) -> None: ...
    def replayed(self, model: str, answered: bool) -> None: ...
    def load(self, model: str, error: BaseException | None) -> None: ...
    def watch(self, snapshot: Snapshot) -> None: ...
    def watch_limits(self, readings: Readings) -> None: ...
    def serve(self, host: str, port: int) -> int: ...
    def stop(self) -> None: ...


def fold(value: str, allowed: Collection[str]) -> str:
    """``value`` when it is in ``allowed``, else ``other``."""
    return value if value in allowed else OTHER


class NoMetrics:
    """Metrics off: every hook does nothing, so the hot path pays one call and imports nothing."""

    enabled = False

    def request(self, method: str, model: str, backend: str, code: str, seconds: float) -> None:
        """One finished RPC: its method, the model and backend it named ("" when none), the name of its gRPC
        status code, and its time in the server."""

    def queued(self, model: str, seconds: float) -> None:
        """A request left the model's queue after ``seconds``."""

    def batch(self, model: str, rows: int) -> None:
        """One batched backend call of ``rows`` requests."""

    def first_token(self, model: str, seconds: float) -> None:
        """A streamed request's first text arrived ``seconds`` after the request did (a load and the queue
        included); a unary call cannot tell its first token from its last, so it records none."""

    def spent(self, model: str, generation: Generation) -> None:
        """A finished generation's usage and cost (its ``cost`` set)."""

    def replayed(self, model: str, answered: bool) -> None:
        """A call that a ``--replay`` server looked up in its record: answered from it, or a miss."""

    def load(self, model: str, error: BaseException | None) -> None:
        """A load attempt ended: ``error`` None when it succeeded."""

    def watch(self, snapshot: Snapshot) -> None:
        """Read the model cache's state from ``snapshot()`` at scrape time."""

    def watch_limits(self, readings: Readings) -> None:
        """Read the rate limiters' state from ``readings()`` at scrape time."""

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (0: none)."""
        return 0

    def stop(self) -> None:
        """Stop the HTTP endpoint."""


class Metrics(NoMetrics):
    """The metric families in a registry of their own, and the HTTP endpoint serving them."""

    enabled = True

    def __init__(self, process: bool = True, backends: Collection[str] = ()) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        #: the backend names that label the scrape-time gauges; others are ``other``
        self.backends = frozenset(backends)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._server: WSGIServer | None = None
        reg = self.registry
        self._requests = Counter(
            "clemserve_requests",
            "RPCs finished, by method, model, backend and gRPC status code",
            ("method", "model", "backend", "code"),
            registry=reg,
        )
        self._latency = Histogram(
            "clemserve_request_duration_seconds",
            "RPC latency in the server, from the call's arrival to its answer",
            ("method", "model", "backend"),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._queue = Histogram(
            "clemserve_queue_wait_seconds",
            "time a generation waited in its model's queue before it started (0 when it started at once)",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._first_token = Histogram(
            "clemserve_time_to_first_token_seconds",
            "time from a generation's arrival to its first token, where a backend reports that token (streaming)",
            ("model",),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._batch = Histogram(
            "clemserve_batch_size",
            "requests merged into one batched backend call (huggingface_local)",
            ("model",),
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self._prompt_tokens = Counter(
            "clemserve_prompt_tokens", "prompt tokens of finished generations", ("model",), registry=reg
        )
        self._completion_tokens = Counter(
            "clemserve_completion_tokens", "completion tokens of finished generations", ("model",), registry=reg
        )
        self._cached_prompt_tokens = Counter(
            "clemserve_cached_prompt_tokens",
            "prompt tokens a cache served (the provider's prompt cache, or the server's prefix cache)",
            ("model",),
            registry=reg,
        )
        self._computed_prompt_tokens = Counter(
            "clemserve_computed_prompt_tokens",
            "prompt tokens no cache served: computed by the model (or sent to the provider uncached)",
            ("model",),
            registry=reg,
        )
        self._reasoning_tokens = Counter(
            "clemserve_reasoning_tokens",
            "completion tokens the model spent reasoning, where its provider reports them",
            ("model",),
            registry=reg,
        )
        self._cost = Counter(
            "clemserve_cost_usd", "US dollars of priced generations at the model's prices", ("model",), registry=reg
        )
        self._compute = Counter(
            "clemserve_compute_seconds",
            "generation seconds of models the server runs (from leaving the queue to the reply)",
            ("model",),
            registry=reg,
        )
        self._unpriced = Counter(
            "clemserve_unpriced_generations", "paid generations that had no price", ("model",), registry=reg
        )
        self._replayed = Counter(
            "clemserve_replayed_calls",
            "calls a --replay server looked up in its record, by result (answered, miss)",
            ("model", "result"),
            registry=reg,
        )
        self._loads = Counter(
            "clemserve_model_loads",
            "model load attempts by outcome (ok, error, cancelled)",
            ("model", "outcome"),
            registry=reg,
        )
        if process:
            ProcessCollector(registry=reg)

    # -- hooks on the hot path ----------------------------------------------------------------

    def request(self, method: str, model: str, backend: str, code: str, seconds: float) -> None:
        self._child(self._requests, method, model, backend, code).inc()
        self._child(self._latency, method, model, backend).observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        self._child(self._queue, model).observe(seconds)

    def batch(self, model: str, rows: int) -> None:
        self._child(self._batch, model).observe(rows)

    def first_token(self, model: str, seconds: float) -> None:
        self._child(self._first_token, model).observe(seconds)

    def spent(self, model: str, generation: Generation) -> None:
        self._child(self._prompt_tokens, model).inc(generation.prompt_tokens)
        self._child(self._completion_tokens, model).inc(generation.completion_tokens)
        self._child(self._cached_prompt_tokens, model).inc(generation.cached_prompt_tokens)
        computed = max(0, generation.prompt_tokens - generation.cached_prompt_tokens)
        self._child(self._computed_prompt_tokens, model).inc(computed)
        self._child(self._reasoning_tokens, model).inc(generation.reasoning_tokens)
        cost = generation.cost
        if cost is not None:
            self._child(self._cost, model).inc(cost.usd)
            self._child(self._compute, model).inc(cost.compute_seconds)
            if cost.unpriced:
                self._child(self._unpriced, model).inc()

    def replayed(self, model: str, answered: bool) -> None:
        self._child(self._replayed, model, "answered" if answered else "miss").inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: the label sets are bounded, and prometheus_client's own lookup
        (validation, a lock) is most of a hook's cost."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def load(self, model: str, error: BaseException | None) -> None:
        outcome = "ok" if error is None else "cancelled" if isinstance(error, asyncio.CancelledError) else "error"
        self._loads.labels(model, outcome).inc()

    # -- scrape-time state and the endpoint ---------------------------------------------------

    def watch(self, snapshot: Snapshot) -> None:
        self.registry.register(_CacheCollector(snapshot, self.backends))

    def watch_limits(self, readings: Readings) -> None:
        self.registry.register(_LimitCollector(readings))

    def serve(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def create(port: int, backends: Collection[str] = ()) -> NoMetrics:
    """Metrics when a port is set (``--metrics-port``), else the do-nothing twin; ``backends``: the backend
    names the gauges may carry."""
    return Metrics(backends=backends) if port else NoMetrics()


class _CacheCollector:
    """Gauges read from a snapshot of the model cache when Prometheus scrapes: nothing is counted per request."""

    def __init__(self, snapshot: Snapshot, backends: frozenset[str]) -> None:
        self.snapshot = snapshot
        self.backends = backends

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauges = {
            "queue": GaugeMetricFamily(
                "clemserve_queue_depth", "requests waiting in a model's queue", labels=["model"]
            ),
            "flight": GaugeMetricFamily(
                "clemserve_requests_in_flight",
                "generations running on a model (those waiting are clemserve_queue_depth)",
                labels=["model"],
            ),
            "state": GaugeMetricFamily(
                "clemserve_model_state",
                "models in the cache by state (loading, ready, failed)",
                labels=["model", "backend", "state"],
            ),
            "load": GaugeMetricFamily(
                "clemserve_model_load_seconds", "how long a model's last load took", labels=["model"]
            ),
            "memory": GaugeMetricFamily(
                "clemserve_model_memory_bytes",
                "a loaded model's memory, as estimated before loading and as measured",
                labels=["model", "kind"],
            ),
        }
        values: dict[str, defaultdict[tuple[str, ...], float]] = {k: defaultdict(float) for k in gauges}
        loaded = 0
        for model in self.snapshot().models:
            name, state = model.name, model.state.name.lower()
            values["state"][name, fold(model.backend, self.backends), state] += 1
            if model.state is not ModelState.READY:
                continue
            loaded += 1
            values["flight"][(name,)] += model.running
            values["load"][(name,)] = max(values["load"][(name,)], model.load_seconds)
            values["queue"][(name,)] += model.queued
            values["memory"][name, "estimated"] += model.estimated_bytes
            values["memory"][name, "measured"] += model.measured_bytes
        for key, family in gauges.items():
            for labels, value in values[key].items():
                family.add_metric(list(labels), value)
            yield family
        yield GaugeMetricFamily("clemserve_models_loaded", "models ready to serve", value=loaded)


class _LimitCollector:
    """The rate limiters' gauges, read when Prometheus scrapes."""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        concurrency = GaugeMetricFamily(
            "clemserve_rate_limit_concurrency",
            "a rate limiter's current concurrency limit, as 429 answers lowered it and successes raised it",
            labels=["limit"],
        )
        flight = GaugeMetricFamily(
            "clemserve_rate_limit_in_flight", "calls a rate limiter has let through to the provider", labels=["limit"]
        )
        waiting = GaugeMetricFamily(
            "clemserve_rate_limit_waiting", "calls waiting in a rate limiter's queue", labels=["limit"]
        )
        limited = CounterMetricFamily(
            "clemserve_rate_limit_upstream_429", "429 answers the provider gave under a rate limiter", labels=["limit"]
        )
        for reading in self.readings():
            concurrency.add_metric([reading.name], reading.concurrency)
            flight.add_metric([reading.name], reading.in_flight)
            waiting.add_metric([reading.name], reading.waiting)
            limited.add_metric([reading.name], reading.rate_limited)
        yield from (concurrency, flight, waiting, limited)
