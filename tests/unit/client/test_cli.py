"""The ``clemserve`` dispatcher: the operator commands are clients and never import the server package, run
here (tests/unit/test_architecture.py reads the same rule from the source)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.serving import free_port

#: runs ``clemserve`` commands in one process, then reports their exit codes and the server modules imported
PROBE = """
import json, sys
from clemserve.client.cli import main

codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
service = sorted(m for m in sys.modules if m == "clemserve.service" or m.startswith("clemserve.service."))
print(json.dumps({"codes": codes, "service": service}))
"""
CLIENT_COMMANDS = ["models", "health", "generate", "load", "unload", "clemcore-setup", "run"]


def probe(*commands: list[str]) -> tuple[dict[str, Any], str]:
    """The probe's report, and what the commands printed before it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEMSERVE_")}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    *printed, report = run.stdout.splitlines()
    return json.loads(report), "\n".join(printed)


def test_client_commands_do_not_import_the_server(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    helps = [["--help"]] + [[command, "--help"] for command in CLIENT_COMMANDS]
    calls = [
        ["models", "--address", dead],
        ["health", "--address", dead, "--timeout", "2"],
        ["generate", "--address", dead, "-m", "echo", "hi"],
        ["load", "--address", dead, "echo"],
        ["unload", "--address", dead, "echo"],
        ["clemcore-setup", "--address", dead, str(tmp_path)],
    ]
    report, printed = probe(*helps, *calls)
    assert report["service"] == []
    # every command ran to its end: help, or no server reachable
    assert report["codes"] == [0] * len(helps) + [4] * len(calls)
    assert "{serve,prepare,models,health,generate,load,unload,clemcore-setup,run}" in printed


def test_serve_hands_over_to_the_server_and_its_options() -> None:
    """The other side of the above: the probe sees the server package when a command imports it."""
    report, printed = probe(["serve", "--help"], ["prepare", "--help"])
    assert report["codes"] == [0, 0]
    assert "clemserve.service.cli" in report["service"]
    assert printed.startswith("usage: clemserve serve [-h]")
    for option in ("--host", "--port", "--registry", "--auth-token-file", "--cache-dir"):
        assert option in printed, option
    assert "usage: clemserve prepare [-h]" in printed


def test_the_server_commands_are_listed_as_the_server_describes_them() -> None:
    """``clemserve --help`` lists serve and prepare without importing the server: the two must agree."""
    from clemserve.client.cli import SERVER_COMMANDS
    from clemserve.service.cli import _parser

    listing = " ".join(_parser().format_help().split())
    for help_text in SERVER_COMMANDS.values():
        assert help_text in listing


def test_no_option_of_any_command_keeps_only_the_last_of_its_values() -> None:
    """An option that takes several values takes them again when repeated (-g A -g B as -g A B), as -m does."""
    import argparse

    from clemserve.client.cli import parser

    (subcommands,) = (a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    several = {
        (name, action.dest): action
        for name, command in subcommands.choices.items()
        for action in command._actions
        if action.option_strings and action.nargs in ("+", "*")
    }
    assert {("run", "game"), ("run", "experiment"), ("run", "models")} <= set(several)
    for where, action in several.items():
        assert isinstance(action, argparse._ExtendAction | argparse._AppendAction), where
