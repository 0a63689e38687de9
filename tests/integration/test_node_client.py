"""Another language: the Node.js example loads the proto at run time and calls the live server."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.serving import REPO, ServerProcess

EXAMPLE = REPO / "examples" / "node"


def test_node_client_lists_generates_and_reads_the_context_error(server: ServerProcess) -> None:
    node = shutil.which("node")
    if node is None or not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        if os.environ.get("CI"):
            pytest.fail("node or the example's node_modules is missing: make test runs make node-deps")
        pytest.skip("node or node_modules missing: run make node-deps")
    run = subprocess.run([node, str(EXAMPLE / "client.js"), server.address], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    models = lines[0].removeprefix("models: ").split(", ")
    assert "tiny-llama" in models and "echo" in models
    assert lines[1:4] == [
        "echo: Hello from Node.js",
        "clem_player.model_name: echo",
        "finish_reason: FINISH_REASON_STOP",
    ]
    assert lines[4] == "context error: OUT_OF_RANGE Context token limit for echo exceeded 135537/131072"
    assert lines[5] == "tokens_used=135537 tokens_left=-4465 context_size=131072"
    assert lines[6] == "reason: CONTEXT_EXCEEDED"
