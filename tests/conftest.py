"""Shared fixtures: the tiny offline model, the pool of real clemserve processes on free loopback ports, and
the server most tests call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import ServerPool, ServerProcess, hf_entry
from tests.tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def test_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("registry")
    no_weights = folder / "no-weights"
    no_weights.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            (no_weights / file.name).write_bytes(file.read_bytes())
    too_big = folder / "too-big"
    too_big.mkdir()
    with open(too_big / "model.safetensors", "wb") as sparse:
        sparse.truncate(2**40)  # a 1 TiB file that takes no disk: the memory check reads sizes only
    entries = [
        hf_entry("tiny-llama", tiny_model_dir),
        hf_entry("tiny-llama-single-flight", tiny_model_dir),
        hf_entry("tiny-llama-unload", tiny_model_dir),
        hf_entry("tiny-llama-no-weights", no_weights),
        hf_entry("tiny-llama-too-big", too_big),
        {
            "model_name": "echo-small",
            "backend": "echo",
            "model_id": "echo",
            "context_size": "64",
            "model_config": {},
        },
    ]
    path = folder / "test_registry.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """``server_pool(registry, *flags)``: the server for that registry and those flags, shared by the session;
    every one must stop cleanly at its end."""
    pool = ServerPool(tmp_path_factory.mktemp("pool"))
    yield pool
    unclean = [f"exit status {status}:\n{proc.log()}" for proc, status in pool.stop() if status != 0]
    assert not unclean, "\n".join(unclean)


@pytest.fixture(scope="session")
def server(server_pool: ServerPool, test_registry: Path) -> ServerProcess:
    return server_pool(test_registry)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[object]:
    import clemserve.client as backends

    backends.connect(server.address)
    yield backends
