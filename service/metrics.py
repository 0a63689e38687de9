"""Prometheus metrics: one ``Metrics`` per server, or the do-nothing ``NoMetrics`` when they are off.

Off by default (``--metrics-port 0``): the server then never imports ``prometheus_client`` (its start time
is benchmarked) and each hook costs one empty method call. On, every family lives in the server's own
``CollectorRegistry``, so tests and several servers in one process never collide.

The hot path only counts and observes; what the model manager already knows (loaded models, queue depths,
requests in flight, memory, load times) is read when Prometheus scrapes, by ``_ManagerCollector``.

Label values come from bounded sets only, and never carry a secret: an RPC's method name, a gRPC status
name, a backend name that clemserve knows, and a model name that is a registry entry or a loaded model.
Any other model name, which a client may write freely into a spec, is folded to ``other``; a call that
names no model at all (ListModels) has an empty model label.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from .backends import KNOWN_BACKENDS
from .security import is_loopback

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .domain import Generation
    from .models import ModelManager

#: the label of a model name that is neither a registry entry nor loaded, and of an unknown backend
OTHER = "other"
#: request latency: a 1 ms echo up to a 10-minute generation
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: selectors whose labels are kept (game processes send the same few on every turn)
SELECTOR_CACHE_SIZE = 4096


class NoMetrics:
    """Metrics off: every hook does nothing, so the hot path pays one call and imports nothing."""

    enabled = False

    def request(self, method: str, request: object, code: Any, seconds: float) -> None:
        """One finished RPC (see ``Metrics.request``)."""

    def queued(self, model: str, seconds: float) -> None:
        """A request left the model's queue after ``seconds``."""

    def batch(self, model: str, rows: int) -> None:
        """One batched backend call of ``rows`` requests."""

    def first_token(self, model: str, seconds: float) -> None:
        """A streamed request's first text arrived ``seconds`` after the request did (a load and the queue
        included); a unary call cannot tell its first token from its last, so it records none."""

    def tokens(self, model: str, generation: Generation) -> None:
        """A generation's usage."""

    def load(self, model: str, error: BaseException | None) -> None:
        """A load attempt ended: ``error`` None when it succeeded."""

    def watch(self, manager: ModelManager) -> None:
        """Read ``manager``'s state at scrape time."""

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (0: none)."""
        return 0

    def stop(self) -> None:
        """Stop the HTTP endpoint."""


class Metrics(NoMetrics):
    """The metric families in a registry of their own, and the HTTP endpoint serving them."""

    enabled = True

    def __init__(self, process: bool = True) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        self._manager: ModelManager | None = None
        self._registry_names: frozenset[str] = frozenset()
        self._selector_labels: dict[tuple[str, str], tuple[str, str]] = {}
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
        self._loads = Counter(
            "clemserve_model_loads",
            "model load attempts by outcome (ok, error, cancelled)",
            ("model", "outcome"),
            registry=reg,
        )
        if process:
            ProcessCollector(registry=reg)

    # -- hooks on the hot path ----------------------------------------------------------------

    def request(self, method: str, request: object, code: Any, seconds: float) -> None:
        """``code``: the call's grpc.StatusCode; the model and backend labels come from the request's
        selector, resolved the way the manager resolves it (its cache makes that a lookup)."""
        model, backend = self._labels(request)
        self._child(self._requests, method, model, backend, code.name).inc()
        self._child(self._latency, method, model, backend).observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        self._child(self._queue, model).observe(seconds)

    def batch(self, model: str, rows: int) -> None:
        self._child(self._batch, model).observe(rows)

    def first_token(self, model: str, seconds: float) -> None:
        self._child(self._first_token, model).observe(seconds)

    def tokens(self, model: str, generation: Generation) -> None:
        self._child(self._prompt_tokens, model).inc(generation.prompt_tokens)
        self._child(self._completion_tokens, model).inc(generation.completion_tokens)

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

    # -- labels -------------------------------------------------------------------------------

    def _labels(self, request: object) -> tuple[str, str]:
        """(model, backend) of the model a request names: ("", "") when it names none, (other, "") when
        it names one that does not resolve. Kept per selector text where they cannot change (the registry
        does not change while serving; whether a model is loaded does)."""
        selector = getattr(request, "model", None)
        if self._manager is None or selector is None or not selector.WhichOneof("selector"):
            return "", ""
        kind = selector.WhichOneof("selector")
        key = (kind, selector.name if kind == "name" else selector.spec.json)
        labels = self._selector_labels.get(key)
        if labels is None:
            labels = self._resolve_labels(selector)
            if labels[1] == "" or labels[0] in self._registry_names:
                if len(self._selector_labels) >= SELECTOR_CACHE_SIZE:
                    self._selector_labels.pop(next(iter(self._selector_labels)))
                self._selector_labels[key] = labels
        return labels

    def _resolve_labels(self, selector: Any) -> tuple[str, str]:
        from . import convert

        assert self._manager is not None
        try:
            spec = self._manager.resolve(convert.selector_from_proto(selector))
        except Exception:
            return OTHER, ""
        return model_label(spec["model_name"], self._registry_names, self._manager), backend_label(spec["backend"])

    # -- scrape-time state and the endpoint ---------------------------------------------------

    def watch(self, manager: ModelManager) -> None:
        self._manager = manager
        self._registry_names = frozenset(entry["model_name"] for entry in manager.registry)
        self.registry.register(_ManagerCollector(manager))

    def serve(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def create(port: int) -> NoMetrics:
    """Metrics when a port is set (``--metrics-port``), else the do-nothing twin."""
    return Metrics() if port else NoMetrics()


def model_label(name: str, registry_names: AbstractSet[str], manager: ModelManager) -> str:
    """``name`` when it is a registry entry's or a loaded model's (both sets bounded by the operator), else
    other: a client's spec may carry any text as its model_name."""
    if name in registry_names or any(m.spec["model_name"] == name for m in manager.loaded()):
        return name
    return OTHER


def backend_label(name: str) -> str:
    return name if name in KNOWN_BACKENDS else OTHER


def exposure_problem(host: str, public: bool) -> str | None:
    """Why the metrics endpoint must not listen on ``host``, or None: it has no authentication or TLS."""
    if public or is_loopback(host):
        return None
    return (
        f"refusing to serve metrics on {host}, an address other machines can reach: the metrics endpoint has "
        "neither token nor TLS; give --metrics-public to serve them to anyone who can connect"
    )


class _ManagerCollector:
    """Gauges read from the manager when Prometheus scrapes: nothing is counted per request."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .models import ModelState

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
        for model in self.manager.loaded():
            name, state = model.spec["model_name"], model.state.name.lower()
            values["state"][name, backend_label(model.spec["backend"]), state] += 1
            if model.state is not ModelState.READY:
                continue
            loaded += 1
            queued = model.queued  # the manager counts a request from its submission, queued ones too
            values["flight"][(name,)] += max(0, model.in_flight - queued)
            values["load"][(name,)] = max(values["load"][(name,)], model.load_seconds)
            values["queue"][(name,)] += queued
            values["memory"][name, "estimated"] += model.estimated_bytes
            values["memory"][name, "measured"] += model.measured_bytes
        for key, family in gauges.items():
            for labels, value in values[key].items():
                family.add_metric(list(labels), value)
            yield family
        yield GaugeMetricFamily("clemserve_models_loaded", "models ready to serve", value=loaded)
