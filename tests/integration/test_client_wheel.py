"""The distribution as a game machine installs it: a wheel in a fresh virtual environment with only the
client's dependencies, talking to a real server, through the API and through the ``clemserve`` command."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.serving import ServerProcess

if TYPE_CHECKING:
    from tests.integration.conftest import MadeWheel

GAME = """
import sys
import clemserve.client as backends
model = backends.get_model_for("echo")
print(model.generate_response([{"role": "user", "content": "from a clean venv"}])[2])
print(sorted(m for m in ("torch", "transformers", "clemserve.service") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def wheel(made_wheel: MadeWheel) -> Path:
    """The wheel ``make wheel`` builds (test_make_wheel.py checks the build itself)."""
    return made_wheel.path


@pytest.fixture(scope="module")
def game_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and its base (the client's) dependencies only."""
    venv = tmp_path_factory.mktemp("game") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    return venv


def game_side(venv: Path, args: list[str], cwd: Path, address: str) -> subprocess.CompletedProcess[str]:
    """A command on the game machine: its environment's tools first on PATH."""
    env = {"CLEMSERVE_ADDRESS": address, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


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


def test_client_installs_and_runs_without_the_server_stack(
    game_venv: Path, server: ServerProcess, tmp_path: Path
) -> None:
    python = game_venv / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    for server_only in ("torch", "transformers", "grpcio-health-checking", "grpcio-reflection", "prometheus"):
        assert server_only not in listed, server_only
    run = game_side(game_venv, [str(python), "-c", GAME], tmp_path, server.address)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["from a clean venv", "[]"]


def test_operator_commands_run_without_the_server_stack(game_venv: Path, server: ServerProcess, tmp_path: Path) -> None:
    clemserve = str(game_venv / "bin" / "clemserve")
    listing = game_side(game_venv, [clemserve, "--help"], tmp_path, server.address)
    assert listing.returncode == 0, listing.stderr
    assert "{serve,prepare,models,health,generate,load,unload,clemcore-setup,run}" in listing.stdout
    health = game_side(game_venv, [clemserve, "health"], tmp_path, server.address)
    assert (health.returncode, health.stdout) == (0, f"{server.address}: SERVING\n"), health.stderr
    models = game_side(game_venv, [clemserve, "models"], tmp_path, server.address)
    assert models.returncode == 0, models.stderr
    assert models.stdout.split()[:3] == ["NAME", "BACKEND", "STATE"] and "echo-small" in models.stdout
    said = game_side(game_venv, [clemserve, "generate", "-m", "echo", "from", "the", "game"], tmp_path, server.address)
    assert (said.returncode, said.stdout) == (0, "from the game\n"), said.stderr
    setup = game_side(game_venv, [clemserve, "clemcore-setup", "."], tmp_path, server.address)
    assert setup.returncode == 0, setup.stderr
    assert (tmp_path / "clemserve_api.py").read_text().startswith("# Written by `clemserve clemcore-setup`")
    entries = json.loads((tmp_path / "model_registry.json").read_text())
    assert "echo-small" in {entry["model_name"] for entry in entries}


def test_serve_without_the_server_says_what_to_install(game_venv: Path, tmp_path: Path) -> None:
    for command in (["serve"], ["prepare", "echo"], ["serve", "--help"]):
        run = game_side(game_venv, [str(game_venv / "bin" / "clemserve"), *command], tmp_path, "localhost:1")
        assert run.returncode == 2, run.stdout + run.stderr
        assert run.stdout == ""
        assert run.stderr.startswith(f"clemserve: {command[0]} needs the server")
        assert "pip install '/path/to/clemserve[server]'" in run.stderr and "make wheel" in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
