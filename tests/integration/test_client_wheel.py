"""The distribution as a game machine installs it: a wheel in a fresh virtual environment with only the
client's dependencies, talking to a real server."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from serving import REPO, ServerProcess

GAME = """
import sys
import clemserve.client as backends
model = backends.get_model_for("echo")
print(model.generate_response([{"role": "user", "content": "from a clean venv"}])[2])
print(sorted(m for m in ("torch", "transformers", "clemserve.service") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    return next(out.glob("clemserve-*.whl"))


def test_wheel_holds_every_package_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "clemserve/v1/clemserve_pb2.py",
        "clemserve/v1/clemserve_pb2.pyi",
        "clemserve/v1/clemserve_pb2_grpc.py",
        "clemserve/v1/clemserve.proto",
        "clemserve/registry/model_registry.json",
        "clemserve/registry/py.typed",
        "clemserve/client/__init__.py",
        "clemserve/client/py.typed",
        "clemserve/service/backends/huggingface_local.py",
    ):
        assert required in names, required


def test_client_installs_and_runs_without_the_server_stack(wheel: Path, server: ServerProcess, tmp_path: Path) -> None:
    venv = tmp_path / "game-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "torch" not in listed and "transformers" not in listed
    run = subprocess.run(
        [str(python), "-c", GAME],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"CLEMSERVE_ADDRESS": server.address, "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["from a clean venv", "[]"]
