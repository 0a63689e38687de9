"""Server configuration: parsed once, in ``main()``, from flags and their ``CLEMSERVE_*`` twins."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    registries: tuple[Path, ...] = ()
    key_file: Path | None = None
    log_level: str = "INFO"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "clemserve")
    grace_period_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    preload: tuple[str, ...] = ()
    working_dir: Path = field(default_factory=Path.cwd)
    remote_attempts: int = 4
    remote_retry_delay_s: float = 0.5
    remote_max_delay_s: float = 30.0
    remote_timeout_s: float = 300.0

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
    _Option("--log-level", "CLEMSERVE_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", "INFO"),
    _Option(
        "--cache-dir",
        "CLEMSERVE_CACHE_DIR",
        "where prepared model files are kept (default: ~/.cache/clemserve)",
        None,
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
    _Option(
        "--preload",
        "CLEMSERVE_PRELOAD",
        "model name to load before reporting SERVING (repeatable; the twin separates names with ',')",
        None,
        repeatable=True,
    ),
)


def add_server_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add every server flag; a set ``CLEMSERVE_*`` variable becomes the flag's default."""
    for opt in _OPTIONS:
        dest = opt.flag[2:].replace("-", "_")
        env_value = environ.get(opt.env)
        help_text = f"{opt.help} [env {opt.env}]"
        if opt.repeatable:
            sep = os.pathsep if opt.flag == "--registry" else ","
            default = [v for v in env_value.split(sep) if v] if env_value else []
            parser.add_argument(opt.flag, dest=dest, action="append", default=None, help=help_text)
            parser.set_defaults(**{f"{dest}_env": default})
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
        log_level=level,
        cache_dir=Path(args.cache_dir) if args.cache_dir else defaults.cache_dir,
        grace_period_s=number("grace_period", args.grace_period, float),
        max_message_bytes=int(number("max_message_mb", args.max_message_mb, float) * 1024 * 1024),
        preload=tuple(preload),
        remote_attempts=max(1, int(number("remote_attempts", args.remote_attempts, int))),
        remote_retry_delay_s=number("remote_retry_delay", args.remote_retry_delay, float),
        remote_max_delay_s=number("remote_max_delay", args.remote_max_delay, float),
        remote_timeout_s=number("remote_timeout", args.remote_timeout, float),
    )


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="clemserve serve")
    add_server_options(parser, environ)
    return config_from_args(parser.parse_args(argv))
