"""The ``clemserve`` command: one entry point for the server and for the operator commands that drive it.

``serve`` and ``prepare`` run the server: they are handed, with their arguments, to ``clemserve.service.cli``,
which owns their options. Every other command is a client (``commands``, ``clemcore_setup``) and runs where
only the client is installed, as on a game machine: ``clemserve.service`` is imported for ``serve`` and
``prepare`` only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from . import clemcore_setup, commands, run

#: the commands that run the server, with the help lines clemserve.service.cli gives them
SERVER_COMMANDS = {
    "serve": "run the gRPC server",
    "prepare": "load models once (converting or caching what they need), report, and exit",
}
#: what the server imports from the [server] extra before it starts (pyproject.toml)
SERVER_MODULES = ("grpc_health", "grpc_reflection")


def parser() -> argparse.ArgumentParser:
    """Every command, for ``clemserve --help`` and the client commands' arguments."""
    top = argparse.ArgumentParser(
        prog="clemserve",
        description="Serve clembench models over gRPC, and drive a running server.",
        epilog="exit codes: 0 success, 2 usage error, 3 the server refused or failed, 4 no server reachable",
    )
    commands.add_connection_flags(top, os.environ)
    subcommands = top.add_subparsers(dest="command", required=True)
    for name, help_text in SERVER_COMMANDS.items():
        # listed only: main() hands these to the server's own parser before this one sees them
        subcommands.add_parser(name, help=help_text, add_help=False)
    commands.add_commands(subcommands, os.environ)
    clemcore_setup.add_parser(subcommands, os.environ)
    run.add_parser(subcommands, os.environ)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in SERVER_COMMANDS:
        return _server(arguments)
    top = parser()
    args, unknown = top.parse_known_args(arguments)
    if args.command in SERVER_COMMANDS:
        # the connection flags came first: they are the client's, and the server's own flags follow its name
        top.error(
            f"{args.command} takes its own flags after its name (clemserve {args.command} --help): --address, "
            "--timeout, --token and the TLS flags are for the client commands"
        )
    if unknown:
        top.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        # its episode workers connect, each to its model's recorded address unless --address says otherwise:
        # the flags given reach them through the environment, with no defaults filled in here
        return run.run(args)
    try:
        commands.connect(args, os.environ)
    except (OSError, ValueError) as exc:
        top.error(str(exc))
    if args.command in commands.CLIENT_COMMANDS:
        return commands.run(args)
    return clemcore_setup.run(args)


def _server(arguments: list[str]) -> int:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"clemserve: {arguments[0]} needs the server, which is not installed here (no module {missing[0]}): "
            "install clemserve with its [server] extra, or the extra of the backends it serves ([hf], [vllm], "
            "[remote]), from a checkout (pip install '/path/to/clemserve[server]') or a wheel that make wheel builds "
            "(pip install 'dist/clemserve-VERSION-py3-none-any.whl[server]'); clemserve is not on PyPI",
            file=sys.stderr,
        )
        return commands.EXIT_USAGE
    from clemserve.service.cli import main as server_main

    return server_main(arguments)


if __name__ == "__main__":
    sys.exit(main())
