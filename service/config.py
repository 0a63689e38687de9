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
            raise SystemExit(
                f"clemserve: --{name.replace('_', '-')} must be a number, got {value!r}"
            ) from None

    registries = args.registry if args.registry is not None else args.registry_env
    preload = args.preload if args.preload is not None else args.preload_env
    level = str(args.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SystemExit(
            f"clemserve: --log-level must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}"
        )
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
    )


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="clemserve serve")
    add_server_options(parser, environ)
    return config_from_args(parser.parse_args(argv))
