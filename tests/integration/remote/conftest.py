"""Remote backends against stand-in provider APIs on loopback, through a real clemserve process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.providers import FAKE_KEYS, ServeRemote
from tests.serving import ServerProcess, start_server
from tests.standin import StandIn


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


@pytest.fixture(scope="module")
def serve_remote(tmp_path_factory: pytest.TempPathFactory, standin: StandIn) -> Iterator[ServeRemote]:
    """Start clemserve with the given registry entries; every key entry points its base_url at the stand-in.

    Fast retries (10 ms base delay) keep fault-injection tests quick; pass extra flags to change them.
    """
    started: list[ServerProcess] = []

    def serve(
        entries: list[dict[str, Any]], *flags: str, keys: dict[str, dict[str, Any]] | None = None
    ) -> ServerProcess:
        folder = tmp_path_factory.mktemp("remote")
        registry = folder / "registry.json"
        registry.write_text(json.dumps(entries))
        key_file = folder / "key.json"
        default_keys = {name: {"api_key": key, "base_url": standin.url} for name, key in FAKE_KEYS.items()}
        key_file.write_text(json.dumps(keys if keys is not None else default_keys))
        proc = start_server(
            folder,
            "--registry", str(registry), "--key-file", str(key_file),
            "--remote-retry-delay", "0.01", "--remote-max-delay", "0.2", *flags,
            env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""},
        )  # fmt: skip
        started.append(proc)
        return proc

    yield serve
    for proc in started:
        assert proc.stop() == 0, proc.log()
