"""A generic gRPC tool can call the server: buf curl finds the methods through reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import ServerProcess


def buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("buf (PyPI buf-bin) is part of the dev extra and should be installed")
    return found


def test_buf_curl_generate_and_list_methods(server: ServerProcess) -> None:
    url = f"http://{server.address}"
    request = {"model": {"name": "echo"}, "messages": [{"role": "user", "content": "hi from buf"}]}
    run = subprocess.run(
        [buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(request),
         f"{url}/clemserve.v1.ModelService/Generate"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["responseText"] == "hi from buf"
    assert json.loads(reply["responseJson"])["clem_player"]["model_name"] == "echo"
    methods = subprocess.run(
        [buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods", url],
        capture_output=True, text=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert "clemserve.v1.ModelService/Generate" in methods and "grpc.health.v1.Health/Check" in methods
