"""Several servers, each with its own models: the model named in the call's metadata where a gateway reads it
(and checked against the request body), the listing across servers, a clemcore working directory that
holds the entries of two servers side by side, ``clemserve run`` playing a two-player game whose players'
models are on different servers (each entry's server, or ``--address`` repeated), and game code and ``clem run``
sending each model to its server by the route table (``CLEMSERVE_ROUTES``), with no gateway."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.integration.test_clemcore import clemcore_python, game_side
from tests.serving import REPO, ServerPool, ServerProcess, free_port

CLEMSERVE = [sys.executable, "-m", "clemserve.client.cli"]
HELLO = [pb.Message(role="user", content="hello there")]
#: guesswhat instances each run plays
EPISODES = 4


@pytest.fixture(scope="module")
def second_server(server_pool: ServerPool, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """A server with models of its own (echo-b), and one name (echo-small) that the shared server has too."""
    folder = tmp_path_factory.mktemp("second-registry")
    echo = {"backend": "echo", "model_id": "echo", "model_config": {}}
    registry = folder / "registry.json"
    registry.write_text(json.dumps([{"model_name": "echo-b", **echo}, {"model_name": "echo-small", **echo}]))
    return server_pool(registry)


def clemserve(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEMSERVE_")}
    return subprocess.run([*CLEMSERVE, *arguments], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def generate(address: str, metadata: tuple[tuple[str, str], ...]) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        model=pb.ModelSelector(name="echo-small"), messages=HELLO, args=pb.GenerationArgs(max_tokens=8)
    )
    with grpc.insecure_channel(address) as channel:
        reply: pb.GenerateResponse = pb_grpc.ModelServiceStub(channel).Generate(request, metadata=metadata, timeout=30)
        return reply


def test_the_metadata_must_name_the_model_of_the_body(server: ServerProcess) -> None:
    """What a gateway routed by (the metadata) and what the server would answer (the body) must agree; a
    caller that sends no metadata (another language, buf curl) is served as before."""
    assert generate(server.address, ()).response_text == "hello there"
    assert generate(server.address, (("clemserve-model", "echo-small"),)).response_text == "hello there"
    with pytest.raises(grpc.RpcError) as caught:
        generate(server.address, (("clemserve-model", "tiny-llama"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "clemserve-model" in details and "'tiny-llama'" in details and "'echo-small'" in details, details


def test_models_lists_every_server_s_models_with_its_server(
    server: ServerProcess, second_server: ServerProcess, tmp_path: Path
) -> None:
    a, b, gone = server.address, second_server.address, f"127.0.0.1:{free_port()}"
    run = clemserve("models", "--available", "--address", a, "--address", b, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    header, *rows = [line.split() for line in run.stdout.splitlines()]
    assert header[:3] == ["SERVER", "NAME", "BACKEND"]
    listed = {(row[0], row[1]) for row in rows}
    assert {(a, "tiny-llama"), (a, "echo-small"), (b, "echo-b"), (b, "echo-small")} <= listed
    assert (a, "echo-b") not in listed and (b, "tiny-llama") not in listed
    assert f"note: echo-small is on 2 servers: {a}, {b}" in run.stderr.splitlines()
    # a server that does not answer is reported, with its exit code; the others are listed
    run = clemserve("models", "--address", gone, "--address", b, "--timeout", "5", cwd=tmp_path)
    assert run.returncode == 4 and gone in run.stderr
    assert any(line.split()[:2] == [b, "echo-b"] for line in run.stdout.splitlines()), run.stdout


def test_clemcore_setup_for_a_second_server_keeps_the_first_server_s_entries(
    server: ServerProcess, second_server: ServerProcess, tmp_path: Path
) -> None:
    a, b = server.address, second_server.address
    game = tmp_path / "game"
    game.mkdir()

    def entries() -> list[tuple[str, str]]:
        registry = json.loads((game / "model_registry.json").read_text())
        return [(entry["model_config"]["clemserve_address"], entry["model_name"]) for entry in registry]

    first = clemserve("clemcore-setup", "--address", a, str(game), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    of_a = entries()
    assert (a, "tiny-llama") in of_a and {address for address, _ in of_a} == {a}
    second = clemserve("clemcore-setup", "--address", b, str(game), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    both = entries()
    assert both[: len(of_a)] == of_a and (b, "echo-b") in both[len(of_a) :]
    assert f"note: echo-small is on 2 servers ({a}, {b}): games play it on {a}" in second.stderr
    # set up again, a server replaces its own entries only, where they stood; both at once, the same file
    again = clemserve("clemcore-setup", "--address", a, str(game), cwd=tmp_path)
    assert again.returncode == 0 and entries() == both, again.stderr
    together = tmp_path / "together"
    together.mkdir()
    at_once = clemserve("clemcore-setup", "--address", a, "--address", b, str(together), cwd=tmp_path)
    assert at_once.returncode == 0, at_once.stderr
    assert (together / "model_registry.json").read_text() == (game / "model_registry.json").read_text()


def calls_by_server(*servers: ServerProcess) -> dict[tuple[str, str], int]:
    """The calls each server has answered for each of its models since it started."""
    from clemserve.client.admin import list_servers

    listings = list_servers([server.address for server in servers], timeout=30)
    return {(listing.address, status.name): status.spend.calls for listing in listings for status in listing.models}


def test_run_plays_each_player_on_its_server(
    server: ServerProcess, second_server: ServerProcess, tmp_path: Path
) -> None:
    """guesswhat with the guesser's echo-small on the shared server (the second has it too: the run takes the
    first) and the answerer's echo-b on the second server only: played after clemcore-setup for both servers
    with no --address (each entry's server), then with --address repeated and entries that point nowhere."""
    games = REPO.parent / "shared" / "clembench-games"
    if not (games / "guesswhat").is_dir():
        pytest.fail(f"no clembench games at {games}")
    python = clemcore_python()
    a, b = server.address, second_server.address
    game = shutil.copytree(games / "guesswhat", tmp_path / "guesswhat")
    instances = json.loads((game / "in" / "instances.json").read_text())
    # prompts that echo models play by the rules: the guesser asks, the answerer answers (three calls)
    experiment = instances["experiments"][0]
    experiment.update(guesser_initial_prompt="QUESTION: Alive?", answerer_initial_prompt="ANSWER: no")
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    instances["experiments"] = [experiment]
    (game / "in" / "echo.json").write_text(json.dumps(instances))
    clemserve_cli = str(python.parent / "clemserve")
    setup = game_side(python, [clemserve_cli, "clemcore-setup", "--address", a, "--address", b], tmp_path)
    assert setup.returncode == 0, setup.stderr
    run = [clemserve_cli, "run", "-g", "guesswhat", "-i", "echo", "-m", "echo-small", "echo-b", "-l", "2", "-j", "2"]

    def played(results: str, *flags: str) -> str:
        before = calls_by_server(server, second_server)
        done = game_side(python, [*run, "-r", results, *flags], tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{EPISODES} episodes: {EPISODES} played, 0 failed" in done.stdout
        after = calls_by_server(server, second_server)
        made = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
        assert set(made) == {(a, "echo-small"), (b, "echo-b")}, made  # each player on its own server only
        (record,) = (tmp_path / results).glob("*/clemserve.json")
        assert [m["server_address"] for m in json.loads(record.read_text())["models"]] == [a, b]
        for episode in (tmp_path / results).glob("*/guesswhat/Level_1/instance_*"):
            said = (episode / "interactions.json").read_text()
            assert "QUESTION: Alive?" in said and "ANSWER: no" in said
        return done.stderr

    assert "note: echo-small" not in played("entries")
    # --address repeated decides, not the entries: each model goes to the first server that has it
    registry = tmp_path / "model_registry.json"
    entries = json.loads(registry.read_text())
    for entry in entries:
        if entry.get("backend") == "clemserve":
            entry["model_config"]["clemserve_address"] = f"127.0.0.1:{free_port()}"
    registry.write_text(json.dumps(entries))
    said = played("routed", "--address", a, "--address", b)
    assert f"note: echo-small is on 2 servers ({a}, {b}): the run plays it on {a}" in said
    # a model that no server named has: the run does not start
    unknown = [*run[:7], "echo-small", "no-such-model", "--address", a, "--address", b]
    refused = game_side(python, unknown, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"model no-such-model is on none of the servers named with --address: {a}, {b}" in refused.stderr


def test_game_code_sends_each_model_to_its_server_by_the_routes(
    server: ServerProcess, second_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLEMSERVE_ROUTES, no gateway: echo-small to the shared server, although the second (named as replicas,
    ipv4:) has it too and its route matches it later; echo-b to the second. CLEMSERVE_ADDRESS names no server
    (routes come before it), and an explicit address still comes before the routes."""
    import clemserve.client as backends
    from clemserve.client import channel

    a, b = server.address, second_server.address
    hello = [{"role": "user", "content": "hello there"}]
    monkeypatch.setattr(channel, "_default_address", None)  # a connect() of another test
    monkeypatch.setenv("CLEMSERVE_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("CLEMSERVE_ROUTES", f"echo-small={a}; echo-*=ipv4:{b}")
    before = calls_by_server(server, second_server)
    for name, address in [("echo-small", None), ("echo-b", None), ("echo-small", b)]:
        with backends.get_model_for(name, address=address, lease=False) as model:
            model.set_gen_arg("max_tokens", 8)  # echo-small's context is 64 tokens
            assert model.generate_response(hello)[2] == "hello there"

    async def asynchronous() -> str:
        model = await backends.get_async_model_for("echo-b", lease=False)
        model.set_gen_arg("max_tokens", 8)
        return (await model.generate_response(hello))[2]

    assert asyncio.run(asynchronous()) == "hello there"
    after = calls_by_server(server, second_server)
    made = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert made == {(a, "echo-small"): 1, (b, "echo-b"): 2, (b, "echo-small"): 1}


def test_clem_run_follows_a_route_before_the_address_and_the_entry(
    server: ServerProcess, second_server: ServerProcess, tmp_path: Path
) -> None:
    """The clemserve backend that clem run loads: echo-small's entry records the shared server (the first of the
    two entries for it) and CLEMSERVE_ADDRESS names no server, yet its route sends it to the second."""
    python = clemcore_python()
    a, b = server.address, second_server.address
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", a, "--address", b], tmp_path
    )
    assert setup.returncode == 0, setup.stderr
    recorded = json.loads((tmp_path / "model_registry.json").read_text())
    first = next(entry for entry in recorded if entry["model_name"] == "echo-small")
    assert first["model_config"]["clemserve_address"] == a
    script = (
        "from clemcore import backends\nmodel = backends.load_model('echo-small', {'max_tokens': 8})\n"
        "print(model.remote.address)\n"
        "print(model.generate_response([{'role': 'user', 'content': 'hello there'}])[2])\n"
    )
    before = calls_by_server(server, second_server)
    dead = f"127.0.0.1:{free_port()}"
    routes = {"CLEMSERVE_ADDRESS": dead, "CLEMSERVE_ROUTES": f"echo-small={b}"}
    run = game_side(python, [str(python), "-c", script], tmp_path, **routes)
    assert run.returncode == 0 and run.stdout.splitlines()[-2:] == [b, "hello there"], run.stdout + run.stderr
    after = calls_by_server(server, second_server)
    assert {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)} == {
        (b, "echo-small"): 1
    }
