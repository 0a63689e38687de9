"""Shared fixtures: the tiny offline model and a real clemserve process on a free loopback port."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import ServerProcess, hf_entry, start_server
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
def server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("server"), "--registry", str(test_registry))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[object]:
    import clemserve.client as backends

    backends.connect(server.address)
    yield backends
