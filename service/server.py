"""Server lifecycle: start, report SERVING, drain on SIGTERM/SIGINT, unload, exit 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clemserve.registry import Key, KeyRegistry, ModelRegistry
from clemserve.v1 import clemserve_pb2, clemserve_pb2_grpc

from .backends import KNOWN_BACKENDS, BackendContext
from .config import ServerConfig
from .draining import Drain
from .draining import current as current_drain
from .logs import redact_logs
from .metrics import create as create_metrics
from .model_cache import ModelCache
from .security.auth import interceptors, server_credentials
from .security.redaction import Redactor
from .servicer import ModelServicer

log = logging.getLogger(__name__)

SERVICE_NAME = clemserve_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
#: after the grace period, how long the calls being ended get to send their status
CUT_S = 2.0


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
    )
    return ModelCache(
        registry,
        context,
        allow_client_specs=config.security.allow_client_specs,
        policy=config.scheduling,
        metrics=create_metrics(config.metrics.port, KNOWN_BACKENDS),
        residency=config.residency,
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
    if not await drain.finished(config.grace_period_s):
        log.info("grace period over: ending %d calls with SHUTTING_DOWN", drain.cut())
        await drain.finished(CUT_S)
    await server.stop(CUT_S)
    await manager.shutdown()
    manager.metrics.stop()
    log.info("stopped")
    return 0
