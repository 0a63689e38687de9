"""Remote backends against stand-in provider APIs on loopback, through a real clemserve process."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from standin import StandIn

from conftest import ServerProcess, start_server

#: distinctive fake keys, random so that redaction never meets them in ordinary words; the leak scans
#: look for any part of them longer than the last 4 characters
FAKE_KEYS = {
    "openai": "sk-u8jzPde0IgxLd6GncfBAepfJ",
    "openai_compatible": "sk-Bd0Kh8oOOL8dKLzdocJ2isAj",
    "openrouter": "sk-IhKtJ0RlgLKOmxgJTeKdNnFR",
    "azure_gpt": "sk-IBXuDL7DxtpYlSXpfKtHF4vU",
    "azure_claude": "sk-CsMehGAkWvj7FAc9QeWJKY40",
    "anthropic": "sk-uvSwMFLZDe1f8rESQedUStPK",
    "mistral": "sk-R0CsTy4Qwb8DwkNhFdnXsiVp",
    "cohere": "sk-zz63FfkCzJr4i0B3JrTAwR4y",
    "google": "sk-9ojfljoQoaF1LlqsajAIxNKu",
}


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


ServeRemote = Callable[..., ServerProcess]


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


def assert_no_key_leaks(text: str) -> None:
    """No fake key, nor any part of one longer than its last 4 characters, in ``text``."""
    for name, key in FAKE_KEYS.items():
        for i in range(len(key) - 4):
            assert key[i : i + 5] not in text, f"part of the {name} key leaked: {key[i : i + 5]!r}"


def all_text(path: Path) -> str:
    return path.read_text(errors="replace")
