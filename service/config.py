"""Server configuration: parsed once, in ``main()``, from flags and their ``CLEMSERVE_*`` twins."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backends import catalog, served_backends
from .backends.base import RetryPolicy
from .backends.rate_limits import RateLimit, parse_rate_limit
from .memory import ResidencyPolicy, parse_bytes
from .record import MISS_POLICIES, RecordSettings
from .scheduler import SchedulingPolicy
from .security.settings import Security, _switch, security_from_args
from .spend import SpendLimit, parse_spend_limit
from .validation import Limits


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint (service/metrics.py)."""

    #: its port; 0: no metrics at all
    port: int = 0
    host: str = "127.0.0.1"
    #: serve metrics on a non-loopback host (they have no token or TLS)
    public: bool = False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    registries: tuple[Path, ...] = ()
    key_file: Path | None = None
    #: prices that override genai-prices' for paid models, by model_name or model_id (service/pricing.py)
    prices: Path | None = None
    log_level: str = "INFO"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "clemserve")
    grace_period_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    preload: tuple[str, ...] = ()
    working_dir: Path = field(default_factory=Path.cwd)
    #: how remote calls are retried (the --remote-* flags)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    scheduling: SchedulingPolicy = field(default_factory=SchedulingPolicy)
    residency: ResidencyPolicy = field(default_factory=ResidencyPolicy)
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: nice increment of the generation threads of local models on the CPU (0: the server's own priority);
    #: 5 bounds what other busy processes can take from generation (docs/many-processes.md)
    compute_nice: int = 5
    #: let a huggingface_local model meant for GPUs run some layers on the CPU or disk when it does not fit
    allow_offload: bool = False
    #: bytes of a huggingface_local model's prefix cache; None: the default for its dtype; 0: off
    prefix_cache_bytes: int | None = None
    #: weights may come from the Hugging Face hub; off, the server reads local folders and the hub's cache only
    online: bool = False
    #: the limits remote calls wait under, per key entry or backend name (--rate-limit)
    rate_limits: tuple[tuple[str, RateLimit], ...] = ()
    #: the most a provider or key entry may spend per calendar period (--spend-limit, service/spend.py)
    spend_limits: tuple[SpendLimit, ...] = ()
    #: --record, --replay and --replay-miss (service/record.py)
    recording: RecordSettings = field(default_factory=RecordSettings)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class _Option:
    flag: str
    env: str
    help: str
    default: str | None
    repeatable: bool = False
    #: a flag without a value; its twin is on when set to 1, true, yes or on
    switch: bool = False
    #: what separates a repeatable flag's values in its environment twin (--registry: os.pathsep)
    separator: str = ","


_OPTIONS = (
    _Option("--host", "CLEMSERVE_HOST", "address to bind", "127.0.0.1"),
    _Option("--port", "CLEMSERVE_PORT", "port to bind (0 picks a free one)", "50051"),
    _Option(
        "--registry",
        "CLEMSERVE_REGISTRY",
        "model registry file, looked up before ./model_registry.json and the packaged registry "
        f"(repeatable; the environment twin separates files with '{os.pathsep}')",
        None,
        repeatable=True,
    ),
    _Option(
        "--key-file",
        "CLEMSERVE_KEY_FILE",
        "key.json with API keys (default: ./key.json, then ~/.clemcore/key.json)",
        None,
    ),
    _Option(
        "--prices",
        "CLEMSERVE_PRICES",
        'JSON file of prices by model_name or model_id: {"m": {"input_per_mtok": USD, "output_per_mtok": USD, '
        '"cached_input_per_mtok": USD}}; they override genai-prices\' (docs/spend.md)',
        None,
    ),
    _Option("--log-level", "CLEMSERVE_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO"),
    _Option(
        "--cache-dir",
        "CLEMSERVE_CACHE_DIR",
        "where prepared model files are kept (default: ~/.cache/clemserve)",
        None,
    ),
    _Option(
        "--online",
        "CLEMSERVE_ONLINE",
        "let loads download weights from the Hugging Face hub (HF_ENDPOINT); without it the server is offline: "
        "local folders and the Hugging Face cache only, and HF_HUB_OFFLINE=1 in the environment refuses --online",
        None,
        switch=True,
    ),
    _Option(
        "--grace-period",
        "CLEMSERVE_GRACE_PERIOD",
        "seconds that calls in flight get to finish on SIGTERM/SIGINT",
        "30",
    ),
    _Option(
        "--max-message-mb",
        "CLEMSERVE_MAX_MESSAGE_MB",
        "largest gRPC message accepted or sent, in MiB",
        "64",
    ),
    _Option(
        "--remote-attempts",
        "CLEMSERVE_REMOTE_ATTEMPTS",
        "tries per remote call, the first included, for transient provider failures",
        "4",
    ),
    _Option(
        "--remote-retry-delay",
        "CLEMSERVE_REMOTE_RETRY_DELAY",
        "base of the exponential backoff between remote tries, in seconds (with full jitter)",
        "0.5",
    ),
    _Option(
        "--remote-max-delay",
        "CLEMSERVE_REMOTE_MAX_DELAY",
        "longest wait between remote tries, in seconds (caps Retry-After too)",
        "30",
    ),
    _Option(
        "--remote-timeout",
        "CLEMSERVE_REMOTE_TIMEOUT",
        "seconds one remote HTTP request may take (the caller's gRPC deadline also bounds it)",
        "300",
    ),
    # scheduling: per model, a bounded queue with fair turns across callers, and batches
    _Option(
        "--max-queue",
        "CLEMSERVE_MAX_QUEUE",
        "requests that may wait per model; more are refused at once with RESOURCE_EXHAUSTED",
        "256",
    ),
    _Option(
        "--max-batch",
        "CLEMSERVE_MAX_BATCH",
        "most waiting requests merged into one batched call (huggingface_local)",
        "8",
    ),
    _Option(
        "--max-wait-ms",
        "CLEMSERVE_MAX_WAIT_MS",
        "how long a request waits for others to join its batch, in milliseconds",
        "5",
    ),
    _Option(
        "--compute-nice",
        "CLEMSERVE_COMPUTE_NICE",
        "lower the CPU priority of the generation threads of local models on the CPU by this many nice steps "
        "(0 to 19), so new requests, refusals and health checks are not held up behind generation; 0: off. "
        "Models on a GPU keep the server's priority",
        "5",
    ),
    _Option(
        "--allow-offload",
        "CLEMSERVE_ALLOW_OFFLOAD",
        "let a huggingface_local model that does not fit on its GPUs run some layers on the CPU or disk (slow); "
        "without it such a load fails with RESOURCE_EXHAUSTED",
        None,
        switch=True,
    ),
    _Option(
        "--prefix-cache",
        "CLEMSERVE_PREFIX_CACHE",
        "KV states a huggingface_local model keeps by prompt prefix, so that a prompt repeating an earlier one's "
        "beginning computes only the rest: auto (1GiB for float32 weights, where reuse gives the same greedy "
        "outputs; off for others), a size such as 2GiB (on for every dtype), or 0 (off) (docs/prefix-cache.md)",
        "auto",
    ),
    # residency: which models stay loaded (service/residency.py, docs/residency.md)
    _Option(
        "--memory-budget",
        "CLEMSERVE_MEMORY_BUDGET",
        "memory for loaded models: auto (90%% of the GPU's memory, else 80%% of RAM) or a size such as 8GiB",
        "auto",
    ),
    _Option(
        "--keep-alive",
        "CLEMSERVE_KEEP_ALIVE",
        "seconds an idle, unleased model stays loaded (0 or less: until evicted or unloaded)",
        "1800",
    ),
    _Option("--max-concurrent-loads", "CLEMSERVE_MAX_CONCURRENT_LOADS", "model loads running at once", "1"),
    _Option(
        "--kv-cache-tokens",
        "CLEMSERVE_KV_CACHE_TOKENS",
        "KV-cache tokens (rows x (prompt + max_tokens)) a huggingface_local model's memory estimate allows its "
        "batches, capped by --max-batch rows at its whole context; a batch needing more borrows free budget or "
        "runs in smaller batches",
        "32768",
    ),
    _Option(
        "--load-timeout",
        "CLEMSERVE_LOAD_TIMEOUT",
        "seconds a load may take before it fails with UNAVAILABLE (LOAD_TIMEOUT), counted after the download of "
        "its weights from the hub (0 or less: no limit)",
        "1800",
    ),
    _Option(
        "--download-stall-timeout",
        "CLEMSERVE_DOWNLOAD_STALL_TIMEOUT",
        "seconds a download of weights from the hub may go without a byte before the load fails with UNAVAILABLE "
        "(DOWNLOAD_STALLED) (0 or less: never)",
        "300",
    ),
    _Option(
        "--lease-timeout",
        "CLEMSERVE_LEASE_TIMEOUT",
        "longest lease (LeaseModel) in seconds; a lease's ttl_seconds may shorten it",
        "1800",
    ),
    # input limits: a request over one is INVALID_ARGUMENT naming the field
    _Option(
        "--max-request-mb",
        "CLEMSERVE_MAX_REQUEST_MB",
        "largest serialized request, in MiB (gRPC refuses messages over --max-message-mb before this)",
        "48",
    ),
    _Option("--max-messages", "CLEMSERVE_MAX_MESSAGES", "most messages in one request", "1024"),
    _Option("--max-message-chars", "CLEMSERVE_MAX_MESSAGE_CHARS", "most characters in one message", "1000000"),
    _Option("--max-total-chars", "CLEMSERVE_MAX_TOTAL_CHARS", "most characters in all messages together", "4000000"),
    _Option("--max-tokens-cap", "CLEMSERVE_MAX_TOKENS_CAP", "largest max_tokens a caller may ask for", "65536"),
    _Option("--max-images", "CLEMSERVE_MAX_IMAGES", "most images in one request", "32"),
    _Option("--max-image-mb", "CLEMSERVE_MAX_IMAGE_MB", "largest image, in MiB", "20"),
    _Option("--max-images-mb", "CLEMSERVE_MAX_IMAGES_MB", "most image bytes in one request, in MiB", "40"),
    _Option(
        "--max-json-depth",
        "CLEMSERVE_MAX_JSON_DEPTH",
        "deepest nesting of objects and lists in a model spec, extra_json and generation arguments",
        "16",
    ),
    # security: see service/security/ and docs/security.md
    _Option(
        "--auth-token",
        "CLEMSERVE_AUTH_TOKEN",
        "callers must send 'authorization: Bearer TOKEN' (health and reflection stay open); "
        "prefer --auth-token-file, since a command line is visible to other users",
        None,
    ),
    _Option("--auth-token-file", "CLEMSERVE_AUTH_TOKEN_FILE", "file holding the --auth-token", None),
    _Option(
        "--admin-token",
        "CLEMSERVE_ADMIN_TOKEN",
        "token needed for LoadModel, UnloadModel and other state-changing calls (default: any accepted token)",
        None,
    ),
    _Option("--admin-token-file", "CLEMSERVE_ADMIN_TOKEN_FILE", "file holding the --admin-token", None),
    _Option("--tls-cert", "CLEMSERVE_TLS_CERT", "PEM certificate chain: serve TLS only", None),
    _Option("--tls-key", "CLEMSERVE_TLS_KEY", "PEM private key of --tls-cert", None),
    _Option(
        "--tls-client-ca",
        "CLEMSERVE_TLS_CLIENT_CA",
        "PEM CA certificates: require client certificates signed by them (mutual TLS)",
        None,
    ),
    _Option(
        "--insecure",
        "CLEMSERVE_INSECURE",
        "allow a non-loopback --host with neither a token nor TLS",
        None,
        switch=True,
    ),
    _Option(
        "--allow-client-specs",
        "CLEMSERVE_ALLOW_CLIENT_SPECS",
        "let selectors add a model id, path, base_url, backend, trust_remote_code, chat template or engine "
        "arguments that their registry entry lacks",
        None,
        switch=True,
    ),
    # metrics: see service/metrics.py and docs/metrics.md
    _Option(
        "--metrics-port",
        "CLEMSERVE_METRICS_PORT",
        "serve Prometheus metrics over HTTP on this port (0: off, nothing is recorded)",
        "0",
    ),
    _Option("--metrics-host", "CLEMSERVE_METRICS_HOST", "address the metrics endpoint binds", "127.0.0.1"),
    _Option(
        "--metrics-public",
        "CLEMSERVE_METRICS_PUBLIC",
        "allow a non-loopback --metrics-host: the endpoint has no token or TLS, anyone who connects reads it",
        None,
        switch=True,
    ),
    # record and replay: see service/record.py and docs/spend.md
    _Option(
        "--record",
        "CLEMSERVE_RECORD",
        "append every call answered (its canonical request, the reply's triple, usage and time) to this JSON Lines "
        "file, created 0600: it holds prompts, never keys",
        None,
    ),
    _Option(
        "--replay",
        "CLEMSERVE_REPLAY",
        "answer each request recorded in this file (a --record file) from it, identical requests in their "
        "recorded order, without calling the model",
        None,
    ),
    _Option(
        "--replay-miss",
        "CLEMSERVE_REPLAY_MISS",
        "what a request not in the --replay file gets: refuse (FAILED_PRECONDITION, reason REPLAY_MISS) or "
        "forward (the model answers it, and is paid for it)",
        "refuse",
    ),
    _Option(
        "--preload",
        "CLEMSERVE_PRELOAD",
        "model name to load before reporting SERVING (repeatable; the twin separates names with ',')",
        None,
        repeatable=True,
    ),
    # rate limits per provider key: see service/backends/rate_limits.py and docs/spend.md
    _Option(
        "--rate-limit",
        "CLEMSERVE_RATE_LIMIT",
        "limits for a key.json entry or remote backend, held by the server, which queues calls instead of meeting "
        "429s: NAME=concurrency:N,rpm:N,tpm:N (any of the three; concurrency adapts to 429 answers) "
        "(repeatable; the twin separates limits with ';')",
        None,
        repeatable=True,
        separator=";",
    ),
    # spend limits per provider or key: see service/spend.py and docs/spend.md
    _Option(
        "--spend-limit",
        "CLEMSERVE_SPEND_LIMIT",
        "the most a key.json entry or remote backend may spend per calendar period in UTC: NAME=USD/PERIOD, PERIOD "
        "hour, day or month (openai=50/day); a call whose worst case would pass it is refused (RESOURCE_EXHAUSTED, "
        "QUOTA_EXCEEDED); what was spent is kept in <cache dir>/spend.sqlite3 (repeatable; the twin separates "
        "limits with ';')",
        None,
        repeatable=True,
        separator=";",
    ),
)


def add_server_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add every server flag; a set ``CLEMSERVE_*`` variable becomes the flag's default."""
    for opt in _OPTIONS:
        dest = opt.flag[2:].replace("-", "_")
        env_value = environ.get(opt.env)
        help_text = f"{opt.help} [env {opt.env}]"
        if opt.repeatable:
            sep = os.pathsep if opt.flag == "--registry" else opt.separator
            default = [v for v in env_value.split(sep) if v] if env_value else []
            parser.add_argument(opt.flag, dest=dest, action="append", default=None, help=help_text)
            parser.set_defaults(**{f"{dest}_env": default})
        elif opt.switch:
            parser.add_argument(
                opt.flag, dest=dest, action="store_const", const=True, default=env_value, help=help_text
            )
        else:
            parser.add_argument(opt.flag, dest=dest, default=env_value or opt.default, help=help_text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    def number(name: str, value: str, kind: type[float] | type[int]) -> float:
        try:
            return kind(value)
        except ValueError:
            raise SystemExit(f"clemserve: --{name.replace('_', '-')} must be a number, got {value!r}") from None

    registries = args.registry if args.registry is not None else args.registry_env
    preload = args.preload if args.preload is not None else args.preload_env
    level = str(args.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SystemExit(f"clemserve: --log-level must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}")
    defaults = ServerConfig()
    return ServerConfig(
        host=args.host,
        port=int(number("port", args.port, int)),
        registries=tuple(Path(p) for p in registries),
        key_file=Path(args.key_file) if args.key_file else None,
        prices=Path(args.prices) if args.prices else None,
        log_level=level,
        cache_dir=Path(args.cache_dir) if args.cache_dir else defaults.cache_dir,
        grace_period_s=number("grace_period", args.grace_period, float),
        max_message_bytes=int(number("max_message_mb", args.max_message_mb, float) * 1024 * 1024),
        preload=tuple(preload),
        retry=RetryPolicy(
            attempts=max(1, int(number("remote_attempts", args.remote_attempts, int))),
            base_delay_s=number("remote_retry_delay", args.remote_retry_delay, float),
            max_delay_s=number("remote_max_delay", args.remote_max_delay, float),
            request_timeout_s=number("remote_timeout", args.remote_timeout, float),
        ),
        scheduling=SchedulingPolicy(
            max_queue=max(1, int(number("max_queue", args.max_queue, int))),
            max_batch=max(1, int(number("max_batch", args.max_batch, int))),
            max_wait_s=max(0.0, number("max_wait_ms", args.max_wait_ms, float) / 1000),
        ),
        compute_nice=_compute_nice(int(number("compute_nice", args.compute_nice, int))),
        allow_offload=_switch(args.allow_offload),
        prefix_cache_bytes=_prefix_cache(str(args.prefix_cache)),
        online=_switch(args.online),
        limits=limits_from_args(args),
        rate_limits=rate_limits_from(args.rate_limit if args.rate_limit is not None else args.rate_limit_env),
        spend_limits=spend_limits_from(args.spend_limit if args.spend_limit is not None else args.spend_limit_env),
        security=security_from_args(args),
        metrics=MetricsSettings(
            port=_metrics_port(int(number("metrics_port", args.metrics_port, int))),
            host=args.metrics_host,
            public=_switch(args.metrics_public),
        ),
        residency=residency_from_args(args, number),
        recording=recording_from_args(args),
    )


def recording_from_args(args: argparse.Namespace) -> RecordSettings:
    miss = str(args.replay_miss).strip().lower()
    if miss not in MISS_POLICIES:
        raise SystemExit(f"clemserve: --replay-miss must be refuse or forward, got {args.replay_miss!r}")
    record = Path(args.record) if args.record else None
    replay = Path(args.replay) if args.replay else None
    if record is not None and replay is not None and record.resolve() == replay.resolve():
        raise SystemExit(f"clemserve: --record and --replay name the same file ({record}): record to another one")
    return RecordSettings(record=record, replay=replay, replay_miss=miss)


def residency_from_args(args: argparse.Namespace, number: Callable[[str, str, type[float]], float]) -> ResidencyPolicy:
    budget = str(args.memory_budget).strip()
    if budget.lower() != "auto":
        try:
            parse_bytes(budget)
        except ValueError as exc:
            raise SystemExit(f"clemserve: --memory-budget: {exc}") from None
    lease_timeout = number("lease_timeout", args.lease_timeout, float)
    if lease_timeout <= 0:
        raise SystemExit(f"clemserve: --lease-timeout must be a positive number, got {args.lease_timeout!r}")
    return ResidencyPolicy(
        memory_budget=budget,
        keep_alive_s=number("keep_alive", args.keep_alive, float),
        max_concurrent_loads=max(1, int(number("max_concurrent_loads", args.max_concurrent_loads, float))),
        load_timeout_s=number("load_timeout", args.load_timeout, float),
        download_stall_s=number("download_stall_timeout", args.download_stall_timeout, float),
        lease_timeout_s=lease_timeout,
        kv_cache_tokens=_kv_cache_tokens(args.kv_cache_tokens),
    )


def _kv_cache_tokens(value: str) -> int:
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens <= 0:
        raise SystemExit(f"clemserve: --kv-cache-tokens must be a positive number of tokens, got {value!r}")
    return tokens


def _prefix_cache(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise SystemExit(f"clemserve: --prefix-cache must be auto, 0 or a size such as 2GiB: {exc}") from None


def _compute_nice(increment: int) -> int:
    if not 0 <= increment <= 19:
        raise SystemExit(f"clemserve: --compute-nice must be 0 (off) to 19, got {increment}")
    return increment


def _metrics_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise SystemExit(f"clemserve: --metrics-port must be 0 (off) or a port number up to 65535, got {port}")
    return port


def limits_from_args(args: argparse.Namespace) -> Limits:
    def positive(name: str, kind: type[float] | type[int], zero_allowed: bool = False) -> float:
        value = getattr(args, name)
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if not (number >= 0 if zero_allowed else number > 0):
            raise SystemExit(f"clemserve: --{name.replace('_', '-')} must be a positive number, got {value!r}")
        return number

    def mib(name: str) -> int:
        return max(1, int(positive(name, float) * 1024 * 1024))

    return Limits(
        request_bytes=mib("max_request_mb"),
        messages=int(positive("max_messages", int)),
        message_chars=int(positive("max_message_chars", int)),
        total_chars=int(positive("max_total_chars", int)),
        max_tokens=int(positive("max_tokens_cap", int)),
        images=int(positive("max_images", int, zero_allowed=True)),
        image_bytes=mib("max_image_mb"),
        total_image_bytes=mib("max_images_mb"),
        json_depth=int(positive("max_json_depth", int)),
    )


def rate_limits_from(values: Sequence[str]) -> tuple[tuple[str, RateLimit], ...]:
    """The ``--rate-limit`` values, each for a key.json entry of a remote backend or such a backend's name,
    each name once; SystemExit naming the flag, the name and the field that is wrong."""
    known = set()
    for backend in served_backends():
        keys = {route.key for route in catalog(backend).routes if route.key}
        if keys:  # a remote backend
            known |= keys | {backend}
    limits: dict[str, RateLimit] = {}
    for value in values:
        try:
            name, limit = parse_rate_limit(value)
        except ValueError as exc:
            raise SystemExit(f"clemserve: --rate-limit: {exc}") from None
        if name not in known:
            raise SystemExit(
                f"clemserve: --rate-limit: unknown name {name!r}; a key.json entry or remote backend: "
                + ", ".join(sorted(known))
            )
        if name in limits:
            raise SystemExit(f"clemserve: --rate-limit: {name} is given twice")
        limits[name] = limit
    return tuple(limits.items())


def spend_limits_from(values: Sequence[str]) -> tuple[SpendLimit, ...]:
    """The ``--spend-limit`` values, each for a key.json entry of a remote backend or such a backend's name,
    each name and period once; SystemExit naming the flag, the name and the field that is wrong."""
    known = _remote_names()
    limits: dict[tuple[str, str], SpendLimit] = {}
    for value in values:
        try:
            limit = parse_spend_limit(value)
        except ValueError as exc:
            raise SystemExit(f"clemserve: --spend-limit: {exc}") from None
        if limit.name not in known:
            raise SystemExit(
                f"clemserve: --spend-limit: unknown name {limit.name!r}; a key.json entry or remote backend: "
                + ", ".join(sorted(known))
            )
        if (limit.name, limit.period) in limits:
            raise SystemExit(f"clemserve: --spend-limit: {limit.name} has two limits per {limit.period}")
        limits[limit.name, limit.period] = limit
    return tuple(limits.values())


def _remote_names() -> set[str]:
    """The remote backends' names and the key.json entries they read."""
    known = set()
    for backend in served_backends():
        keys = {route.key for route in catalog(backend).routes if route.key}
        if keys:
            known |= keys | {backend}
    return known


def hub_environment(online: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The variable that keeps huggingface_hub (and so transformers, llama.cpp's and vLLM's downloads, in this
    process and those it starts) as offline as the server is: set before any of them is imported. An
    HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) that says offline refuses --online rather than losing to it."""
    if not online:
        return {"HF_HUB_OFFLINE": "1"}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _switch(environ.get(name, "")):
            raise SystemExit(f"clemserve: --online, but {name}={environ[name]} in the environment keeps the hub off")
    return {"HF_HUB_OFFLINE": "0"}


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="clemserve serve")
    add_server_options(parser, environ)
    return config_from_args(parser.parse_args(argv))
