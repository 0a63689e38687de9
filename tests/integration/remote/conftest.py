"""Remote backends against a stand-in provider API on loopback, through real clemserve processes that every
module here shares.

The registry holds the ``ENTRIES`` of every module collected from this folder (a name given twice must name
the same entry). ``server`` serves it with a key file that points every provider at the stand-in;
``odd_keys_server`` with key entries that are missing or incomplete (``odd_keys``), for what a caller
then gets. Both retry fast (10 ms base delay, waits capped at 1 s: a Retry-After of up to 1 s is
honoured) with the server's default of 4 attempts. The stand-in is cleared before every test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.providers import FAKE_KEYS
from tests.serving import ServerPool, ServerProcess
from tests.standin import StandIn

HERE = Path(__file__).resolve().parent
RETRY_FLAGS = ("--remote-retry-delay", "0.01", "--remote-max-delay", "1")
#: what a key entry pointing elsewhere gets: plain http to another machine (a documentation address)
FAR_HTTP = "http://192.0.2.10/openai/v1"


def all_keys(url: str) -> dict[str, dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = {name: {"api_key": key, "base_url": url} for name, key in FAKE_KEYS.items()}
    # clembench reads the British spelling "organisation" from key.json
    keys["openai"]["organisation"] = "org-uk"
    return keys


def odd_keys(url: str) -> dict[str, dict[str, Any]]:
    """No google, anthropic or cohere entry; the others as the comments say."""
    return {
        # the US spelling that KeyRegistry.register writes is accepted too
        "openai": {"api_key": FAKE_KEYS["openai"], "base_url": url, "organization": "org-us"},
        "openrouter": {"base_url": url},  # no api_key
        "openai_compatible": {"api_key": FAKE_KEYS["openai_compatible"]},  # no base_url
        "mistral": {"base_url": url},  # no api_key
        # only the route's own entry is needed (clembench required both azure entries)
        "azure_claude": {"api_key": FAKE_KEYS["azure_claude"], "base_url": url},
        # plain http to another machine would send the key in clear text
        "azure_gpt": {"api_key": FAKE_KEYS["azure_gpt"], "base_url": FAR_HTTP},
    }


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


@pytest.fixture(autouse=True)
def clear_standin(standin: StandIn) -> Iterator[None]:
    standin.clear()
    yield
    standin.release.set()


@pytest.fixture(scope="session")
def remote_registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    entries: dict[str, dict[str, Any]] = {}
    modules = {item.module for item in request.session.items if isinstance(item, pytest.Function)}
    for module in sorted((m for m in modules if Path(m.__file__).parent == HERE), key=lambda m: m.__name__):
        for entry in getattr(module, "ENTRIES", []):
            known = entries.setdefault(entry["model_name"], entry)
            assert known == entry, f"two registry entries named {entry['model_name']}: {known} and {entry}"
    path = tmp_path_factory.mktemp("remote") / "registry.json"
    path.write_text(json.dumps(list(entries.values()), indent=2))
    return path


def _key_file(folder: Path, keys: dict[str, dict[str, Any]]) -> Path:
    path = folder / "key.json"
    path.write_text(json.dumps(keys, indent=2))
    return path


@pytest.fixture(scope="session")
def server(
    server_pool: ServerPool, remote_registry: Path, standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    key_file = _key_file(tmp_path_factory.mktemp("keys"), all_keys(standin.url))
    return server_pool(remote_registry, "--key-file", str(key_file), *RETRY_FLAGS)


@pytest.fixture(scope="session")
def odd_key_file(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _key_file(tmp_path_factory.mktemp("odd-keys"), odd_keys(standin.url))


@pytest.fixture(scope="session")
def odd_keys_server(server_pool: ServerPool, remote_registry: Path, odd_key_file: Path) -> ServerProcess:
    return server_pool(remote_registry, "--key-file", str(odd_key_file), *RETRY_FLAGS)
