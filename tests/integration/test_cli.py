"""The operator's command line against a live server, driven from a shell as a person would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.serving import ServerProcess, free_port

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
    header = ["NAME", "BACKEND", "STATE", "LOAD", "S", "IN", "FLIGHT", "QUEUED", "LEASES", "MEMORY", "MIB", "SOURCE"]
    assert out[2].split() == header
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
