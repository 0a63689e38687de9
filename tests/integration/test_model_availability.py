"""What a newcomer meets: which models can run here (ListModels' availability, ``clemserve models``), and the
errors for a model the server has no key for and for a name it does not know; through the real client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

import clemserve.client as backends
from tests.serving import ServerProcess, start_server
from tests.standin_hub import StandInHub

ENTRIES = [
    {"model_name": "echo-here", "backend": "echo"},
    {"model_name": "gpt-4o-2024-08-06", "backend": "openai", "model_id": "gpt-4o-2024-08-06"},
    {"model_name": "claude-keyed", "backend": "anthropic", "model_id": "claude-x"},
    {"model_name": "hub-not-cached", "backend": "huggingface_local", "huggingface_id": "clemserve-test/not-cached-xyz"},
    {"model_name": "vllm-model", "backend": "vllm", "huggingface_id": "clemserve-test/not-cached-xyz"},
    {"model_name": "llamacpp-model", "backend": "llamacpp", "huggingface_id": "x/y"},
]
KEY = "sk-Qw7nR2xVb9LmT4kJpZ3s"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("availability")


@pytest.fixture(scope="module")
def key_file(folder: Path) -> Path:
    path = folder / "key.json"
    path.write_text(json.dumps({"anthropic": {"api_key": KEY}}))
    return path


@pytest.fixture(scope="module")
def server(folder: Path, key_file: Path) -> Iterator[ServerProcess]:
    registry = folder / "registry.json"
    registry.write_text(json.dumps(ENTRIES))
    # the server's own default: offline, whatever the environment says (make test's says HF_HUB_OFFLINE=1)
    proc = start_server(
        folder,
        "--registry", str(registry), "--key-file", str(key_file),
        env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "HF_HUB_OFFLINE": "0"},
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


def listed(server: ServerProcess) -> dict[str, tuple[str, str]]:
    return {s.name: (s.availability, s.availability_detail) for s in backends.list_models(address=server.address)}


def test_list_models_says_what_can_run(server: ServerProcess) -> None:
    found = listed(server)
    assert found["echo-here"] == ("can_load", "")
    assert found["gpt-4o-2024-08-06"] == (
        "needs_key",
        "the server's key.json has no `openai` entry and OPENAI_API_KEY is not set",
    )
    assert found["claude-keyed"] == ("can_load", "")
    assert found["hub-not-cached"] == (
        "needs_weights",
        "clemserve-test/not-cached-xyz is not in the server's Hugging Face cache and the server is offline "
        "(serve with --online to download it, or download it into that cache first)",
    )
    assert "Hugging Face hub: offline" in server.log()
    # engines pip cannot simply install name the checkout's make target (clemserve is not on PyPI)
    assert found["vllm-model"][0] == "needs_extra" and found["vllm-model"][1].startswith("make vllm-env")
    if find_spec("llama_cpp") is None:
        assert found["llamacpp-model"][0] == "needs_extra" and "make llamacpp-env" in found["llamacpp-model"][1]
    else:  # the main environment runs llama.cpp too (make llamacpp-env): the weights decide
        assert found["llamacpp-model"][0] == "needs_weights" and "offline" in found["llamacpp-model"][1]
    # listing loaded nothing; a model that loads is ready
    assert {s.state for s in backends.list_models(address=server.address)} == {"not_loaded"}
    model = backends.get_model_for("echo-here", address=server.address)
    model.set_gen_args(temperature=0.0, max_tokens=5)
    model.generate_response([{"role": "user", "content": "hi"}])
    assert listed(server)["echo-here"] == ("ready", "")
    assert KEY[4:] not in json.dumps(found)


def clemserve_models(server: ServerProcess, *flags: str) -> list[list[str]]:
    run = subprocess.run(
        [sys.executable, "-m", "clemserve.client.cli", "models", "--address", server.address, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    table = run.stdout.split("\n\n")[0]  # the blocks after the table (spend, prefix reuse) are not rows
    return [line.split() for line in table.splitlines()]


def test_clemserve_models_has_an_availability_column_and_filters(server: ServerProcess) -> None:
    rows = clemserve_models(server)
    assert rows[0][:4] == ["NAME", "BACKEND", "STATE", "AVAILABILITY"]
    assert rows[0][-3:] == ["SOURCE", "AVAILABILITY", "DETAIL"]
    by_name = {row[0]: row for row in rows[1:]}
    # the server's registry is ours layered over the packaged one
    assert {entry["model_name"] for entry in ENTRIES} <= set(by_name)
    gpt = by_name["gpt-4o-2024-08-06"]
    assert gpt[3] == "needs_key"
    assert " ".join(gpt[14:]) == "the server's key.json has no `openai` entry and OPENAI_API_KEY is not set"
    assert by_name["hub-not-cached"][3] == "needs_weights"
    assert by_name["claude-keyed"][3] == "can_load" and len(by_name["claude-keyed"]) == 14
    available = clemserve_models(server, "--available")
    assert available[0] == rows[0]
    names = [row[0] for row in available[1:]]
    assert {"claude-keyed", "echo-here"} <= set(names)
    assert not {"gpt-4o-2024-08-06", "hub-not-cached", "vllm-model", "llamacpp-model"} & set(names)
    assert all(by_name[name][3] in ("ready", "can_load") for name in names)


def test_missing_key_says_it_belongs_on_the_server(server: ServerProcess, key_file: Path) -> None:
    model = backends.get_model_for("gpt-4o-2024-08-06", address=server.address)
    model.set_gen_args(temperature=0.0, max_tokens=5)
    with pytest.raises(backends.FailedPreconditionError) as caught:
        model.generate_response([{"role": "user", "content": "hi"}])
    assert str(caught.value) == (
        "the server has no key for openai: add an `openai` entry to the server's key.json"
        f" (searched: {key_file}) or set OPENAI_API_KEY on the server"
    )
    assert caught.value.code == "FAILED_PRECONDITION"
    assert caught.value.subject == "key.json: openai"


def test_unknown_model_suggests_close_names(server: ServerProcess) -> None:
    with pytest.raises(backends.ModelNotFoundError) as caught:
        backends.get_model_for("gpt-4o", address=server.address)
    assert str(caught.value) == (
        'No model spec unifies with model selector={"model_name":"gpt-4o"}; '
        "did you mean gpt-4o-2024-08-06 or gpt-4o-mini-2024-07-18? (see `clemserve models`)"
    )
    assert caught.value.code == "NOT_FOUND"
    assert isinstance(caught.value, ValueError)
    with pytest.raises(backends.ModelNotFoundError) as caught:
        backends.get_model_for("zzzzzz", address=server.address)
    assert str(caught.value).endswith('{"model_name":"zzzzzz"} (see `clemserve models`)')


def test_online_weights_not_cached_can_load_only_where_the_hub_has_them(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    registry = tmp_path / "registry.json"
    entries = [
        {"model_name": "on-the-hub", "backend": "huggingface_local", "huggingface_id": "clemserve-test/on-hub"},
        {"model_name": "not-on-the-hub", "backend": "huggingface_local", "huggingface_id": "clemserve-test/none"},
    ]
    registry.write_text(json.dumps(entries))
    with StandInHub() as hub:
        hub.add("clemserve-test/on-hub", repo)
        proc = start_server(
            tmp_path, "--registry", str(registry), "--online",
            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")},
        )  # fmt: skip
        try:
            found = listed(proc)
            assert found["on-the-hub"] == (
                "can_load",
                "the first load downloads clemserve-test/on-hub from the Hugging Face hub",
            )
            assert found["not-on-the-hub"] == (
                "needs_weights",
                f"clemserve-test/none is neither in the server's Hugging Face cache nor on the hub {hub.url}",
            )
            assert {"/api/models/clemserve-test/none", "/api/models/clemserve-test/on-hub"} <= {
                path for _, path in hub.requests
            }
            # answers are kept for the process: a second listing asks the hub nothing
            asked = len(hub.requests)
            assert listed(proc) == found and len(hub.requests) == asked
            assert "Hugging Face hub: online" in proc.log()
        finally:
            assert proc.stop() == 0, proc.log()


def test_online_refuses_an_environment_that_keeps_the_hub_off(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--online", "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    assert "clemserve: --online, but HF_HUB_OFFLINE=1 in the environment keeps the hub off" in run.stderr
