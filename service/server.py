"""Server lifecycle: start, report SERVING, drain on SIGTERM/SIGINT, unload, exit 0."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clemserve.registry import Key, KeyRegistry, ModelRegistry
from clemserve.v1 import clemserve_pb2, clemserve_pb2_grpc

from .backends import KNOWN_BACKENDS, BackendContext
from .backends.rate_limits import RateLimits
from .config import ServerConfig
from .draining import Drain
from .draining import current as current_drain
from .logs import redact_logs
from .metrics import create as create_metrics
from .model_cache import ModelCache
from .pricing import Pricing, read_price_file
from .record import Recording, RecordingModelCache
from .scheduler import CallsInFlight
from .security.auth import interceptors, server_credentials
from .security.redaction import Redactor
from .servicer import ModelServicer
from .spend import SPEND_FILE, SpendLedger

log = logging.getLogger(__name__)

SERVICE_NAME = clemserve_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
#: after the grace period, how long the calls being ended get to send their status
CUT_S = 2.0
#: how often the drain reports its progress in the log
DRAIN_REPORT_S = 5.0


def build_manager(config: ServerConfig) -> ModelCache:
    """Read the registry and key files; a broken file stops the start with a message naming it."""
    registry = ModelRegistry.from_files(config.registries, cwd=config.working_dir)
    keys = KeyRegistry.from_json(config.key_file, cwd=config.working_dir).with_environment(os.environ)
    redactor = Redactor(secret for name in keys for secret in _secrets(keys.get_key_for(name)))
    for token in config.security.tokens:
        redactor.add(token)
    redact_logs(redactor)
    context = BackendContext(
        keys=keys,
        cache_dir=config.cache_dir,
        retry=config.retry,
        redactor=redactor,
        compute_nice=config.compute_nice,
        allow_offload=config.allow_offload,
        prefix_cache_bytes=config.prefix_cache_bytes,
        rate_limits=RateLimits(config.rate_limits),
    )
    metrics = create_metrics(config.metrics.port, KNOWN_BACKENDS)
    metrics.watch_limits(context.rate_limits.states)
    settings = config.recording
    recording = Recording.open(settings) if settings.record or settings.replay else None
    cache = functools.partial(RecordingModelCache, recording=recording) if recording is not None else ModelCache
    return cache(
        registry,
        context,
        allow_client_specs=config.security.allow_client_specs,
        policy=config.scheduling,
        metrics=metrics,
        residency=config.residency,
        pricing=Pricing(read_price_file(config.prices) if config.prices else None).checked(registry),
        spend=SpendLedger(config.spend_limits, config.cache_dir / SPEND_FILE) if config.spend_limits else None,
    )


def _secrets(key: Key) -> list[str]:
    """The values of a key entry that must never leave the server: the key and anything named like one."""
    return [
        str(value)
        for name, value in key.items()
        if value and (name == "api_key" or any(w in name.lower() for w in ("key", "token", "secret", "password")))
    ]


def _protection(config: ServerConfig) -> str:
    security = config.security
    transport = "mutual TLS" if security.tls_client_ca else "TLS" if security.tls else "plain text"
    token = "token required" if security.auth_token else "no token required"
    admin = "admin token for state changes" if security.admin_token else "no admin token"
    specs = "client specs allowed" if security.allow_client_specs else "registry entries only"
    return f"{transport}, {token}, {admin}, {specs}"


async def _drained(drain: Drain, manager: ModelCache, grace_period_s: float) -> bool:
    """Whether every call in flight ended within the grace period; its progress is logged at the start and
    every ``DRAIN_REPORT_S`` seconds (calls, tokens, the time they likely need), so that an operator sees
    whether the grace period will do."""
    deadline = time.monotonic() + grace_period_s
    while True:
        left = deadline - time.monotonic()
        if not len(drain) or left <= 0:  # over: the cut's line says what is left
            return not len(drain)
        log.info("%s", drain_report(len(drain), manager.calls_in_flight(), left))
        if await drain.finished(min(DRAIN_REPORT_S, left)):
            return True


def drain_report(calls: int, flights: Sequence[CallsInFlight], grace_left_s: float) -> str:
    """One line of the drain's progress: the calls in flight, their generations' tokens made and left, and
    how long they likely need against what is left of the grace period."""
    line = f"draining: {calls} calls in flight, {grace_left_s:.0f} s of the grace period left"
    if not flights:
        return line + "; no generation running (the calls wait for a load or the queue)"
    parts, longest = [], 0.0
    for flight in flights:
        made = sum(flight.generated())
        if flight.tokens_per_s:
            need = flight.seconds_left() or 0.0
            longest = max(longest, need)
            parts.append(
                f"{flight.model}: {len(flight.calls)} generations, about {made} of {flight.max_tokens} tokens made, "
                f"{flight.tokens_left()} left, about {need:.1f} s more at {flight.tokens_per_s:.1f} tokens/s per call"
            )
        else:
            running = max(seconds for _, seconds in flight.calls)
            parts.append(
                f"{flight.model}: {len(flight.calls)} generations of up to {flight.max_tokens} tokens, running "
                f"for up to {running:.1f} s (no call finished yet to time the token rate)"
            )
    verdict = f"; expected to end in about {longest:.1f} s" if longest else ""
    if longest > grace_left_s:
        verdict += " (past the grace period: raise --grace-period to keep this work)"
    return f"{line}; " + "; ".join(parts) + verdict


def cut_report(flights: Sequence[CallsInFlight]) -> str:
    """What ending the calls still running throws away: their generations, and how far each got."""
    if not flights:
        return "no generation was running"
    cut = [
        f"{flight.model}: {len(flight.calls)} generations cut at about "
        + ", ".join(f"{made} of {most}" for made, (most, _) in zip(flight.generated(), flight.calls, strict=True))
        + " tokens"
        if flight.tokens_per_s
        else f"{flight.model}: {len(flight.calls)} generations cut after "
        + ", ".join(f"{seconds:.1f} s" for _, seconds in flight.calls)
        for flight in flights
    ]
    return "cut: " + "; ".join(cut) + " (a client that waits for the server sends them again, from the start)"


def _serve_metrics(config: ServerConfig, manager: ModelCache) -> bool:
    """Start the Prometheus endpoint when --metrics-port is set; False when its address cannot be bound."""
    settings = config.metrics
    if not manager.metrics.enabled:
        log.info("metrics off (--metrics-port 0)")
        return True
    try:
        port = manager.metrics.serve(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return False
    log.info("metrics on http://%s:%d/metrics", settings.host, port)
    return True


async def serve(config: ServerConfig, manager: ModelCache) -> int:
    # Generation threads (transformers) hold the GIL between small tensor operations; a short switch
    # interval lets the event loop answer others (health checks, refusals of a full queue) meanwhile.
    sys.setswitchinterval(0.001)
    try:
        credentials = server_credentials(config.security)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    server = grpc.aio.server(
        interceptors=interceptors(config.security, manager.context.redactor),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # long generations: accept client keepalive pings without calls in flight
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    servicer = ModelServicer(
        manager,
        config.limits,
        redactor=manager.context.redactor,
        metrics=manager.metrics,
    )
    clemserve_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    async def model_health(name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(f"{SERVICE_NAME}/{name}", status)

    manager.on_health = model_health
    unusable: list[str] = []

    async def process_unusable(reason: str) -> None:
        # an orchestrator watching the server's health restarts it; calls are still answered meanwhile
        log.error("%s; this process cannot use its GPU until it restarts: health is NOT_SERVING", reason)
        unusable.append(reason)
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    manager.on_process_unusable = process_unusable
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if credentials is not None:
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        log.error("cannot bind %s", config.address)
        return 2
    if not _serve_metrics(config, manager):
        return 2
    drain = Drain()
    current_drain.set(drain)  # before start(): the server's handler tasks inherit this context
    # What start-up made (modules, the registry, grpc) lives as long as the process: out of the collector's
    # sight, a full collection no longer walks it while a call waits.
    gc.collect()
    gc.freeze()
    await server.start()
    log.info("listening on %s:%d (%s)", config.host, port, _protection(config))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    for name in config.preload:
        log.info("preloading %s", name)
        await manager.load(name)
    for service in ("", SERVICE_NAME):
        if not unusable:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("SERVING %d registry entries", len(manager.registry))

    await stop.wait()
    log.info("stopping: refusing new calls, %.0f s for calls in flight", config.grace_period_s)
    # The port stays open while calls drain: a new call is told SHUTTING_DOWN rather than refused a connection.
    drain.stop(config.grace_period_s)
    await health_servicer.enter_graceful_shutdown()
    manager.end_leases()  # leases are no work in flight: they end at once
    if not await _drained(drain, manager, config.grace_period_s):
        flights = manager.calls_in_flight()
        log.info("grace period over: ending %d calls with SHUTTING_DOWN; %s", drain.cut(), cut_report(flights))
        await drain.finished(CUT_S)
    await server.stop(CUT_S)
    await manager.shutdown()
    manager.metrics.stop()
    log.info("stopped")
    return 0
