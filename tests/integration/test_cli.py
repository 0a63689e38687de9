"""The operator's command line against a live server, driven from a shell as a person would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.serving import ServerProcess, free_port, start_server

CLEMSERVE = [sys.executable, "-m", "clemserve.client.cli"]


def shell(script: str, address: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with ``clemserve`` on PATH and CLEMSERVE_ADDRESS set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "clemserve"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m clemserve.client.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CLEMSERVE_ADDRESS": address}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_a_shell_session(server: ServerProcess, tmp_path: Path) -> None:
    run = shell(
        """
        clemserve health; echo "exit=$?"
        clemserve models | head -1; echo "exit=$?"
        clemserve generate -m echo hello from the shell; echo "exit=$?"
        clemserve generate -m echo --json -l 2 one two three > triple.json; echo "exit=$?"
        clemserve load tiny-llama-unload; echo "exit=$?"
        clemserve models | grep tiny-llama-unload; echo "exit=$?"
        clemserve unload tiny-llama-unload; echo "exit=$?"
        clemserve unload tiny-llama-unload; echo "exit=$?"
        clemserve generate -m no-such-model hi; echo "exit=$?"
        clemserve generate -m echo -t 9 hi; echo "exit=$?"
        clemserve generate hi; echo "exit=$?"
        """,
        server.address,
        tmp_path,
    )
    out = run.stdout.splitlines()
    assert out[0] == f"{server.address}: SERVING" and out[1] == "exit=0"
    # the table's columns are test_model_availability's; here, that a table comes
    assert out[2].split()[:3] == ["NAME", "BACKEND", "STATE"] and "SOURCE" in out[2].split(), out[2]
    assert out[4:6] == ["hello from the shell", "exit=0"]
    assert out[6] == "exit=0"
    triple = json.loads((tmp_path / "triple.json").read_text())
    assert triple["response_text"] == "one two" and triple["response"]["clem_player"]["response"] == "one two"
    assert out[7].startswith("tiny-llama-unload: ready (loaded in") and out[8] == "exit=0"
    assert "ready" in out[9] and out[10] == "exit=0"
    assert out[11:15] == ["tiny-llama-unload: unloaded", "exit=0", "tiny-llama-unload: was not loaded", "exit=0"]
    assert out[15:] == ["exit=3", "exit=3", "exit=2"]
    assert "ModelNotFoundError" in run.stderr and "args.temperature" in run.stderr


def test_unreachable_server_exit_code(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    for command in (["models"], ["health", "--timeout", "2"]):
        run = subprocess.run([*CLEMSERVE, *command, "--address", address], capture_output=True, text=True, timeout=60)
        assert run.returncode == 4, run.stderr
        assert address in run.stderr


def test_generate_streams_the_text_and_reports_the_state_on_stderr(server: ServerProcess, tmp_path: Path) -> None:
    run = shell(
        """
        clemserve generate -m echo --stream hello streamed world; echo "exit=$?"
        clemserve generate -m echo --stream --json -l 1 one two > triple.json; echo "exit=$?"
        clemserve generate -m echo -t 9 --stream hi; echo "exit=$?"
        """,
        server.address,
        tmp_path,
    )
    assert run.stdout.splitlines() == ["hello streamed world", "exit=0", "exit=0", "exit=3"], run.stderr
    assert "[ready]" in run.stderr.splitlines()
    assert json.loads((tmp_path / "triple.json").read_text())["response_text"] == "one"
    assert "args.temperature" in run.stderr


def test_prepare_and_serve_go_through_the_same_command(tmp_path: Path) -> None:
    """``clemserve`` hands ``prepare`` and ``serve`` to the server with their own options."""
    run = shell(
        """
        clemserve prepare echo --cache-dir cache; echo "exit=$?"
        clemserve serve --help > serve-help.txt; echo "exit=$?"
        """,
        f"127.0.0.1:{free_port()}",
        tmp_path,
    )
    out = run.stdout.splitlines()
    assert out[0].startswith("echo: ready (loaded in") and out[1:] == ["exit=0", "exit=0"], run.stderr
    usage = (tmp_path / "serve-help.txt").read_text()
    assert usage.startswith("usage: clemserve serve [-h]")
    assert "--registry" in usage and "--auth-token-file" in usage


def test_connection_flags_go_before_or_after_the_command(server: ServerProcess, tmp_path: Path) -> None:
    """--address, --timeout and the TLS flags, on either side of every client command; given twice, the later
    wins. The environment points at no server, so only the flags can reach this one."""
    live, dead = server.address, f"127.0.0.1:{free_port()}"
    (tmp_path / "game").mkdir()
    run = shell(
        f"""
        clemserve --address {live} health; echo "exit=$?"
        clemserve health --address {live}; echo "exit=$?"
        clemserve --address {dead} health --address {live}; echo "exit=$?"
        clemserve --address {live} --timeout 2 health --address {dead}; echo "exit=$?"
        clemserve --address={live} --timeout 30 generate -m echo hi there; echo "exit=$?"
        clemserve --address {live} models > models.txt; echo "exit=$?"
        clemserve --address {live} clemcore-setup --timeout 30 game > /dev/null; echo "exit=$?"
        clemserve --address {live} --timeout 3 --tls health; echo "exit=$?"
        clemserve --tls-ca missing.pem --address {live} models; echo "exit=$?"
        clemserve --address {live} serve --port 1; echo "exit=$?"
        """,
        dead,
        tmp_path,
    )
    assert run.stdout.splitlines() == [
        f"{live}: SERVING",
        "exit=0",
        f"{live}: SERVING",
        "exit=0",
        f"{live}: SERVING",
        "exit=0",
        "exit=4",  # the later --address: no server there
        "hi there",
        "exit=0",
        "exit=0",
        "exit=0",
        "exit=4",  # TLS to a plain-text server: the flag took effect
        "exit=2",
        "exit=2",
    ], run.stderr
    assert f"no server at {dead}" in run.stderr
    assert "echo" in (tmp_path / "models.txt").read_text().split()
    entries = json.loads((tmp_path / "game" / "model_registry.json").read_text())
    assert {entry["model_config"]["clemserve_address"] for entry in entries} == {live}
    assert "clemserve: error: cannot read the TLS CA file missing.pem: No such file or directory" in run.stderr
    assert "clemserve: error: serve takes its own flags after its name (clemserve serve --help)" in run.stderr


def test_the_token_goes_before_or_after_the_command(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--auth-token=s3cret-token-0123456789")
    try:
        run = shell(
            """
            clemserve models > /dev/null; echo "exit=$?"
            clemserve --token s3cret-token-0123456789 models > before.txt; echo "exit=$?"
            clemserve generate --token s3cret-token-0123456789 -m echo after; echo "exit=$?"
            clemserve --token wrong generate -m echo hi --token s3cret-token-0123456789; echo "exit=$?"
            clemserve --token s3cret-token-0123456789 generate -m echo hi --token wrong; echo "exit=$?"
            """,
            server.address,
            tmp_path,
        )
    finally:
        assert server.stop() == 0, server.log()
    assert run.stdout.splitlines() == ["exit=3", "exit=0", "after", "exit=0", "hi", "exit=0", "exit=3"], run.stderr
    assert "echo" in (tmp_path / "before.txt").read_text().split()
    assert run.stderr.count("UnauthenticatedError") == 2 and "s3cret" not in run.stderr
