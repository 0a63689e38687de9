"""``clemserve serve`` runs the server, ``clemserve prepare`` loads models once and exits.

The ``clemserve`` command (``clemserve.client.cli``) hands these two here with their arguments; its other
commands are clients and never import this package. ``python -m clemserve.service.cli serve ...`` runs the
server without that hop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from clemserve.registry.errors import ClemserveError

from .config import add_server_options, config_from_args, hub_environment
from .logs import configure_logging
from .security.settings import exposure_problem, metrics_exposure_problem

log = logging.getLogger("clemserve")


def _parser() -> argparse.ArgumentParser:
    # the help lines are also clemserve.client.cli's SERVER_COMMANDS (which lists these, and cannot import this)
    parser = argparse.ArgumentParser(prog="clemserve", description="Run the clemserve server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    add_server_options(serve, os.environ)
    prepare = commands.add_parser(
        "prepare", help="load models once (converting or caching what they need), report, and exit"
    )
    prepare.add_argument("models", nargs="+", help="model names from the registry")
    add_server_options(prepare, os.environ)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = config_from_args(args)
    # before anything imports huggingface_hub, which reads it once
    os.environ.update(hub_environment(config.online, os.environ))
    configure_logging(config.log_level)
    log.info(
        "Hugging Face hub: %s",
        "online (loads may download weights)"
        if config.online
        else "offline (local folders and the Hugging Face cache only; --online downloads)",
    )
    exposed = exposure_problem(config.host, config.security) if args.command == "serve" else None
    if args.command == "serve" and config.metrics.port:
        exposed = exposed or metrics_exposure_problem(config.metrics.host, config.metrics.public)
    if exposed:
        print(f"clemserve: {exposed}", file=sys.stderr)
        return 2
    from .server import build_manager, serve

    try:
        manager = build_manager(config)
    except (ValueError, OSError) as exc:
        print(f"clemserve: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return asyncio.run(serve(config, manager))
    return asyncio.run(_prepare(manager, args.models))


async def _prepare(manager: object, names: Sequence[str]) -> int:
    from .model_cache import ModelCache

    assert isinstance(manager, ModelCache)
    failed = 0
    for name in names:
        try:
            model = await manager.load(name)
            print(f"{name}: ready (loaded in {model.load_seconds:.1f} s)")
        except ClemserveError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
    await manager.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
