"""clemcore itself, unchanged, plays the server's models after ``clemserve clemcore-setup``.

Everything on the game side runs in an environment that holds clemcore and clemserve's client only, as a game
machine's does (``make clemcore-env``): the setup command, clemcore's load_model(s), generate_response,
generate_batch_response, its ContextExceededError and its ``clem list`` CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.serving import REPO, ServerProcess, free_port

MESSAGES = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you?"},
    {"role": "user", "content": "Tell me the name of the capital of Australia."},
]
ROWS = [[{"role": "user", "content": "What is the capital of France?"}], MESSAGES]
#: what the working directory held before the setup: a model of its own and a clemserve entry of an old server
EARLIER = [
    {"model_name": "my-own-model", "backend": "openai", "model_id": "gpt-x", "model_config": {}},
    {"model_name": "echo-small", "backend": "huggingface_local", "huggingface_id": "someone/echo-small"},
    {"model_name": "gone", "backend": "clemserve", "model_config": {"clemserve_address": "old:1"}},
]

GAME = """
import importlib.util, json, sys
from clemcore import backends
from clemcore.backends import BackendRegistry
from clemcore.backends.utils import ContextExceededError

MESSAGES, ROWS = json.loads(sys.argv[2])
out = {}

def triple(t):
    prompt, response, text = t
    return {"prompt": prompt, "response": response, "text": text}

def context_error(call):
    try:
        call()
    except ContextExceededError as exc:
        return {"class": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc),
                "numbers": [exc.tokens_used, exc.tokens_left, exc.context_size]}
    return None

echo = backends.load_model("echo")
out["echo"] = {"class": type(echo).__name__, "gen_args": dict(echo.gen_args), "batching": echo.supports_batching(),
               "spec": echo.model_spec.to_dict(), **triple(echo.generate_response(MESSAGES))}

tiny, short_echo = backends.load_models(["tiny-llama", "echo"], {"temperature": 0.0, "max_tokens": 8})
out["gen_args"] = [dict(tiny.gen_args), dict(short_echo.gen_args)]
short_echo.set_gen_arg("max_tokens", 2)
out["short_echo"] = short_echo.generate_response(MESSAGES)[2]
out["singles"] = [triple(tiny.generate_response(row)) for row in ROWS]
out["batch"] = [triple(t) for t in tiny.generate_batch_response(ROWS)]

tiny.set_gen_args(temperature=0.0, max_tokens=600)
out["context"] = context_error(lambda: tiny.generate_response(MESSAGES))
out["batch_context"] = context_error(lambda: tiny.generate_batch_response(ROWS))

clemserve_backend = BackendRegistry.from_packaged_and_cwd_files().get_backend_for("clemserve")
out["errors"] = {}
for name, call in {
    "not_found": lambda: clemserve_backend.get_model_for(echo.model_spec.rename("no-such-model")),
    "bad_temperature": lambda: (echo.set_gen_arg("temperature", 9), echo.generate_response(MESSAGES)),
}.items():
    try:
        call()
        out["errors"][name] = None
    except Exception as exc:
        out["errors"][name] = [type(exc).__name__, isinstance(exc, ValueError)]

out["heavy"] = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) or m in sys.modules]
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def clemcore_python() -> Path:
    python = Path(os.environ.get("CLEMSERVE_CLEMCORE_PYTHON") or REPO / ".venv-clemcore" / "bin" / "python")
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no clemcore environment at {python}: make test builds it (make clemcore-env)")
        pytest.skip("no clemcore environment: run make clemcore-env")
    return python


def game_side(python: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A command of the game machine: its environment's tools first on PATH, no address unless given."""
    path = f"{python.parent}:/usr/bin:/bin"
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=cwd, env={"PATH": path, "HOME": str(cwd), **env}
    )


@pytest.fixture(scope="module")
def workdir(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    python = clemcore_python()
    folder = tmp_path_factory.mktemp("clemcore")
    stale = {"model_name": "stale", "backend": "clemserve", "model_config": {"clemserve_address": server.address}}
    (folder / "model_registry.json").write_text(json.dumps([*EARLIER, stale]))
    setup = game_side(
        python, [str(python), "-m", "clemserve.client.cli", "clemcore-setup", "--address", server.address], folder
    )
    assert setup.returncode == 0, setup.stderr
    return python, folder, setup.stderr


@pytest.fixture(scope="module")
def played(workdir: tuple[Path, Path, str]) -> dict[str, Any]:
    python, folder, _ = workdir
    out = folder / "played.json"
    run = game_side(python, [str(python), "-c", GAME, str(out), json.dumps([MESSAGES, ROWS])], folder)
    assert run.returncode == 0, run.stdout + run.stderr
    return dict(json.loads(out.read_text()))


def test_setup_merges_the_registry(server: ServerProcess, workdir: tuple[Path, Path, str]) -> None:
    _, folder, notes = workdir
    entries = json.loads((folder / "model_registry.json").read_text())
    assert entries[:2] == EARLIER[:2]  # other backends stay, first
    assert entries[2] == EARLIER[2]  # another server's entry stays; this server's earlier one (stale) went
    served = {entry["model_name"]: entry for entry in entries[3:]}
    assert "stale" not in served and {"echo", "tiny-llama", "echo-small"} <= set(served)
    assert all(entry["backend"] == "clemserve" for entry in served.values())
    assert served["echo"] == {
        "model_name": "echo",
        "backend": "clemserve",
        "model_id": "echo",
        "model_config": {"clemserve_address": server.address, "clemserve_backend": "echo"},
    }
    assert served["echo-small"]["context_size"] == "64"
    assert "note: echo-small: an entry of another backend comes first" in notes
    source = (folder / "clemserve_api.py").read_text()
    assert "class ClemserveBackend(Backend)" in source


def test_setup_adds_only_what_the_server_can_run(
    server: ServerProcess, workdir: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """So that ``clem list models`` shows what can be played; --all adds the rest."""
    import clemserve.client as backends

    python, folder, notes = workdir
    statuses = backends.list_models(address=server.address)
    runnable = {s.name for s in statuses if s.runnable}
    left_out = {s.name for s in statuses} - runnable
    assert runnable and left_out  # the packaged registry's API models have no key on this server
    entries = json.loads((folder / "model_registry.json").read_text())
    assert {e["model_name"] for e in entries[3:]} == runnable  # after the other server's entry (gone)
    assert f"left out {len(left_out)} models the server cannot run now" in notes and "--all" in notes
    everything = game_side(
        python,
        [str(python), "-m", "clemserve.client.cli", "clemcore-setup", "--all", "--address", server.address],
        tmp_path,
    )
    assert everything.returncode == 0 and "left out" not in everything.stderr, everything.stderr
    entries = json.loads((tmp_path / "model_registry.json").read_text())
    assert {e["model_name"] for e in entries} == runnable | left_out


def test_clem_lists_the_servers_models_and_the_backend(workdir: tuple[Path, Path, str]) -> None:
    python, folder, _ = workdir
    models = game_side(python, ["clem", "list", "models"], folder)
    assert models.returncode == 0, models.stderr
    registry = folder / "model_registry.json"
    for name in ("echo", "tiny-llama", "echo-small"):
        assert f"{name} -> clemserve ({registry})" in models.stdout.splitlines()
    assert f"my-own-model -> openai ({registry})" in models.stdout
    backends = game_side(python, ["clem", "list", "backends"], folder)
    assert "* clemserve (cwd)" in backends.stdout.splitlines(), backends.stdout


def test_load_model_and_generate_response(played: dict[str, Any]) -> None:
    echo = played["echo"]
    assert echo["class"] == "ClemserveModel" and echo["batching"] is True
    assert echo["gen_args"] == {"temperature": 0.0, "max_tokens": 300}  # clemcore's defaults
    assert echo["spec"]["backend"] == "clemserve"
    assert echo["text"] == "Tell me the name of the capital of Australia."
    player = echo["response"]["clem_player"]
    assert player["response"] == echo["text"] and player["model_name"] == "echo"
    assert set(player) == {"call_start", "call_duration", "response", "model_name"}


def test_gen_args_from_load_models_reach_the_server(played: dict[str, Any]) -> None:
    assert played["gen_args"] == [{"temperature": 0.0, "max_tokens": 8}] * 2
    assert played["short_echo"] == "Tell me"


def test_batch_equals_single_calls(played: dict[str, Any]) -> None:
    def timeless(result: dict[str, Any]) -> dict[str, Any]:
        player = {
            k: v for k, v in result["response"]["clem_player"].items() if k not in ("call_start", "call_duration")
        }
        return {**result, "response": {**result["response"], "clem_player": player}}

    assert [timeless(r) for r in played["batch"]] == [timeless(r) for r in played["singles"]]
    assert all(r["response"]["clem_player"]["model_name"] == "tiny-llama" for r in played["batch"])
    assert all(r["text"] == r["response"]["clem_player"]["response"] for r in played["batch"])


def test_context_overflow_is_clemcores_error(server: ServerProcess, played: dict[str, Any]) -> None:
    import clemserve.client as backends

    prompt_tokens = backends.get_model_for("tiny-llama", address=server.address).count_tokens(MESSAGES).prompt_tokens
    used = prompt_tokens + 600
    assert played["context"] == {
        "class": "clemcore.backends.utils.ContextExceededError",
        "message": f"Context token limit for tiny-llama exceeded {used}/512",
        "numbers": [used, 512 - used, 512],
    }
    assert played["batch_context"]["class"] == "clemcore.backends.utils.ContextExceededError"


def test_other_errors_stay_value_errors(played: dict[str, Any]) -> None:
    assert played["errors"] == {
        "not_found": ["ModelNotFoundError", True],
        "bad_temperature": ["InvalidArgumentError", True],
    }


def test_the_game_machine_holds_no_torch(played: dict[str, Any]) -> None:
    assert played["heavy"] == []


def test_clemserve_address_overrides_the_recorded_one(workdir: tuple[Path, Path, str]) -> None:
    python, folder, _ = workdir
    dead = f"127.0.0.1:{free_port()}"
    script = (
        "from clemcore import backends\nimport clemserve.client\n"
        "try:\n    backends.load_model('echo')\nexcept clemserve.client.UnavailableError as exc:\n    print(exc)\n"
    )
    run = game_side(python, [str(python), "-c", script], folder, CLEMSERVE_ADDRESS=dead)
    assert f"cannot reach clemserve at {dead}" in run.stdout, run.stdout + run.stderr


def test_setup_refuses_an_unreadable_registry_and_leaves_it(server: ServerProcess, tmp_path: Path) -> None:
    python = clemcore_python()
    (tmp_path / "model_registry.json").write_text("[{not json")
    run = game_side(
        python,
        [str(python), "-m", "clemserve.client.cli", "clemcore-setup", "--address", server.address, str(tmp_path)],
        tmp_path,
    )
    assert run.returncode == 2 and "model_registry.json: cannot read it" in run.stderr
    assert (tmp_path / "model_registry.json").read_text() == "[{not json"
    assert not (tmp_path / "clemserve_api.py").exists()
