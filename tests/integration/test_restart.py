"""Games survive a server restart: a stopping server says so (UNAVAILABLE, reason SHUTTING_DOWN), and the
client waits for a server it has reached before instead of failing (``CLEMSERVE_WAIT_FOR_SERVER``).

The games here play the tiny model (random weights, greedy: every run answers the same), which restarts in
a few seconds; the demo model would make each restart a load of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from clemserve.registry.errors import ShuttingDownError
from tests.integration.test_clemcore import clemcore_python, game_side
from tests.serving import REPO, ServerProcess, free_port, hf_entry, wait_serving

GAMES = REPO.parent / "shared" / "clembench-games"
TURNS = 30
#: a game process: 30 turns, each answering the last reply; its stdout is the game's record
GAME = """
import sys, time
import clemserve.client as backends
model = backends.get_model_for("tiny-llama", address=sys.argv[1])
model.set_gen_args(temperature=0.0, max_tokens=12)
said = "Hello!"
for turn in range(1, int(sys.argv[2]) + 1):
    said = model.generate_response([{"role": "user", "content": f"Turn {turn}: {said[-40:]}"}])[2]
    print(f"turn {turn}: {said!r}", flush=True)
    time.sleep(0.05)  # paced, so that the restart falls mid-run
"""


def serve_on(folder: Path, port: int, *args: str, name: str) -> ServerProcess:
    """A server on ``port`` (free, or freed by the server before it)."""
    log_path = folder / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "clemserve.service.cli", "serve", "--port", str(port),
        "--cache-dir", str(folder / "cache"), "--log-level", "DEBUG", *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder, env=env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, log_path, timeout=90)
    except BaseException:
        process.kill()
        raise
    return ServerProcess(address, process, log_path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("restart") / "registry.json"
    entries = [
        hf_entry("tiny-llama", tiny_model_dir),
        {"model_name": "sleepy", "backend": "fault", "model_id": "sleepy", "model_config": {"sleep_s": 4}},
        {"model_name": "slow-echo", "backend": "fault", "model_id": "slow", "model_config": {"sleep_s": 0.4}},
        {
            "model_name": "slow-stream",
            "backend": "fault",
            "model_id": "stream",
            "model_config": {"stream_tokens": 60, "token_delay_s": 0.05},
        },
        {  # 50 tokens in 5 s: 10 tokens a second
            "model_name": "slow-tokens",
            "backend": "fault",
            "model_id": "tokens",
            "model_config": {"stream_tokens": 50, "token_delay_s": 0.1},
        },
    ]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Every server a test starts; whatever is still running at its end is killed."""
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(timeout=30)


def restart(servers: list[ServerProcess], how: signal.Signals, *args: str) -> None:
    """Stop the last server with ``how`` and start another on its port."""
    old = servers[-1]
    old.process.send_signal(how)
    old.process.wait(timeout=60)
    time.sleep(0.5)  # the game meets a server that is not there, not only one that is stopping
    port = int(old.address.rsplit(":", 1)[1])
    servers.append(serve_on(old.log_path.parent, port, *args, name=f"server-{len(servers)}"))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.05)


def in_flight(proc: ServerProcess, name: str) -> int:
    return next(s for s in backends.list_models(address=proc.address) if s.name == name).requests_in_flight


def answered(proc: ServerProcess) -> Counter[str]:
    """How often each request id got a Generate reply from this server (its DEBUG log)."""
    return Counter(re.findall(r"\[([0-9a-f]{32})\] Generate -> OK", proc.log()))


# -- what a stopping server says ---------------------------------------------------------------------


def test_a_stopping_server_says_it_is_shutting_down(
    registry: Path, tmp_path: Path, servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")  # fail fast: this test reads the statuses themselves
    servers.append(serve_on(tmp_path, free_port(), "--registry", str(registry), "--grace-period", "1", name="s"))
    proc = servers[0]
    sleepy, echo = (backends.get_model_for(name, address=proc.address, lease=False) for name in ("sleepy", "echo"))
    outcome: dict[str, BaseException] = {}

    def call() -> None:
        try:
            sleepy.generate_response([{"role": "user", "content": "a long one"}])
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: in_flight(proc, "sleepy") == 1, 30, "the call on the server")
    proc.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: refusing new calls" in proc.log(), 10, "drain")

    with pytest.raises(ShuttingDownError) as refused:
        echo.generate_response([{"role": "user", "content": "new"}])
    assert refused.value.reason == "SHUTTING_DOWN" and refused.value.code == "UNAVAILABLE"
    assert str(refused.value) == (
        f"clemserve is shutting down (stopped or restarting) and takes no new calls (at {proc.address})"
    )
    assert refused.value.request_id  # the server's status, with its details

    thread.join(timeout=30)
    cut = outcome["error"]
    assert isinstance(cut, ShuttingDownError) and cut.reason == "SHUTTING_DOWN", repr(cut)
    assert "did not finish within its 1 s grace period" in str(cut)
    assert proc.process.wait(timeout=30) == 0
    assert "grace period over: ending 1 calls with SHUTTING_DOWN" in proc.log()
    assert "Cancelling all calls" not in str(cut)

    started = time.monotonic()
    with pytest.raises(backends.UnavailableError, match=f"cannot reach clemserve at {proc.address}"):
        echo.generate_response([{"role": "user", "content": "gone"}])
    assert time.monotonic() - started < 5  # 0: no waiting


def test_the_drain_reports_its_progress_and_what_it_cut(
    registry: Path, tmp_path: Path, servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")
    flags = ("--registry", str(registry), "--grace-period", "1")
    servers.append(serve_on(tmp_path, free_port(), *flags, name="s"))
    proc = servers[0]
    model = backends.get_model_for("slow-tokens", address=proc.address, lease=False)
    model.set_gen_args(temperature=0.0, max_tokens=50)
    hi = [{"role": "user", "content": "go"}]
    model.generate_response(hi)  # one call finished: the server knows the model's token rate
    errors: list[BaseException] = []

    def call() -> None:
        try:
            model.generate_response(hi)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # both on the server (ListModels, slow on a busy machine, would take longer to tell)
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(timeout=30) == 0
    for thread in threads:
        thread.join(timeout=10)
    assert len(errors) == 2 and all(isinstance(e, ShuttingDownError) for e in errors), errors

    log = proc.log()
    report = re.search(
        r"draining: 2 calls in flight, 1 s of the grace period left; slow-tokens: 2 generations, "
        r"about (\d+) of 100 tokens made, (\d+) left, about [\d.]+ s more at ([\d.]+) tokens/s per call; "
        r"expected to end in about [\d.]+ s",
        log,
    )
    assert report, log
    made, left, rate = int(report[1]), int(report[2]), float(report[3])
    assert made + left == 100 and 7 < rate <= 10.5
    cut = re.search(
        r"grace period over: ending 2 calls with SHUTTING_DOWN; cut: slow-tokens: 2 generations cut at about "
        r"(\d+) of 50, (\d+) of 50 tokens",
        log,
    )
    assert cut and 0 < int(cut[1]) < 50, log


def test_waiting_ends_at_the_deadline_and_the_wait_limit(
    registry: Path, tmp_path: Path, servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    servers.append(serve_on(tmp_path, free_port(), "--registry", str(registry), name="s"))
    proc = servers[0]
    echo = backends.get_model_for("echo", address=proc.address, lease=False, timeout=1.5)
    assert echo.generate_response([{"role": "user", "content": "hi"}])[2] == "hi"
    proc.process.kill()
    proc.process.wait(timeout=30)

    started = time.monotonic()
    with pytest.raises(backends.UnavailableError, match="cannot reach clemserve"):
        echo.generate_response([{"role": "user", "content": "hi"}])
    assert 0.5 < time.monotonic() - started < 1.5 + 1  # waited, but not past the call's deadline

    echo.timeout = None
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "1")
    started = time.monotonic()
    with pytest.raises(
        backends.UnavailableError, match=r"waited \d\.\d s for it to come back; CLEMSERVE_WAIT_FOR_SERVER"
    ):
        echo.generate_response([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 1 + 2

    never = f"127.0.0.1:{free_port()}"  # a server this process never reached fails at once: a wrong address
    started = time.monotonic()
    with pytest.raises(backends.UnavailableError, match=f"cannot reach clemserve at {never}"):
        backends.get_model_for("echo", address=never)
    assert time.monotonic() - started < 3  # no waiting (60 s by default)


def test_only_what_reached_no_caller_is_sent_again(
    registry: Path, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    flags = ("--registry", str(registry), "--grace-period", "1")
    servers.append(serve_on(tmp_path, free_port(), *flags, name="server-0"))
    model = backends.get_model_for("slow-stream", address=servers[0].address, lease=False)
    model.set_gen_args(temperature=0.0, max_tokens=60)
    hi = [{"role": "user", "content": "go"}]
    expected = " ".join(f"t{i}" for i in range(60))

    # a stream that delivered text and is cut by the shutdown fails: its text cannot be taken back
    stream = model.stream_text(hi)
    assert next(stream) == "t0"
    servers[0].process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(ShuttingDownError, match="did not finish within its 1 s grace period"):
        list(stream)
    assert time.monotonic() - started < 10
    assert servers[0].process.wait(timeout=30) == 0

    # with the server away, a stream and an asyncio call wait for it, and are sent once it is back
    outcomes: dict[str, Any] = {}

    def stream_all() -> None:
        outcomes["stream"] = "".join(model.stream_text(hi))

    def async_call() -> None:
        outcomes["async"] = asyncio.run(model.as_async().generate_response(hi))[2]

    threads = [threading.Thread(target=stream_all), threading.Thread(target=async_call)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    assert not outcomes
    port = int(servers[0].address.rsplit(":", 1)[1])
    servers.append(serve_on(tmp_path, port, *flags, name="server-1"))
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == {"stream": expected, "async": expected}


# -- a game process across a restart -----------------------------------------------------------------


def play(address: str, turns: int = TURNS) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", GAME, address, str(turns)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def game_servers(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """One server for the game tests, restarted by each on the same port: the last one is serving."""
    folder = tmp_path_factory.mktemp("game")
    started = [serve_on(folder, free_port(), "--registry", str(registry), "--preload", "tiny-llama", name="server-0")]
    yield started
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(timeout=30)


@pytest.fixture(scope="module")
def undisturbed(game_servers: list[ServerProcess]) -> str:
    out, errors = play(game_servers[-1].address).communicate(timeout=120)
    assert len(out.splitlines()) == TURNS, errors
    return out


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_game_plays_on_across_a_restart(
    registry: Path, game_servers: list[ServerProcess], undisturbed: str, how: signal.Signals
) -> None:
    old = game_servers[-1]
    earlier = answered(old)
    game = play(old.address)
    assert game.stdout is not None
    lines = [game.stdout.readline() for _ in range(10)]  # ten turns played, then the server goes
    restart(game_servers, how, "--registry", str(registry), "--preload", "tiny-llama")
    rest, errors = game.communicate(timeout=120)
    assert game.returncode == 0, errors
    assert "".join(lines) + rest == undisturbed  # every turn, once, as without the restart
    if how == signal.SIGTERM:  # (after SIGKILL, gRPC's own retries may already span the restart)
        assert f"clemserve at {old.address} is away" in errors and "is back after" in errors
    assert re.search(r"lease \w+ on tiny-llama granted", game_servers[-1].log())  # the game's lease, taken again

    before, after = answered(old) - earlier, answered(game_servers[-1])
    assert 10 <= len(before) < TURNS and after, "the restart fell mid-run"
    assert len(before | after) == TURNS  # every turn answered, under one request id each
    assert max((before | after).values()) == 1  # and on each server once
    if how == signal.SIGTERM:
        assert not set(before) & set(after)  # the drain let the turn in flight finish: nothing sent twice
        assert "grace period over" not in old.log()  # no call was cut


# -- clemcore's `clem run` across a restart ------------------------------------------------------------


def results(root: Path) -> dict[str, Any]:
    """The episodes' interactions, without the times that change from run to run."""
    volatile = {"timestamp", "call_start", "call_duration", "duration", "created", "benchmark_start", "benchmark_end"}
    volatile |= {"duration_seconds"}

    def timeless(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k not in volatile}
        if isinstance(value, list):
            return [timeless(v) for v in value]
        return value

    return {str(p.relative_to(root)): timeless(json.loads(p.read_text())) for p in sorted(root.rglob("*.json"))}


def test_clem_run_plays_on_across_a_restart(registry: Path, tmp_path: Path, servers: list[ServerProcess]) -> None:
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    flags = ("--registry", str(registry))
    servers.append(serve_on(tmp_path, free_port(), *flags, name="server-0"))
    folder = tmp_path / "games"
    folder.mkdir()
    shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", servers[0].address], folder
    )
    assert setup.returncode == 0, setup.stderr
    run = ["clem", "run", "-g", "hellogame", "-m", "slow-echo", "-l", "20"]  # 10 episodes, 0.4 s a call

    undisturbed = game_side(python, [*run, "-r", "calm"], folder)
    assert undisturbed.returncode == 0, undisturbed.stdout + undisturbed.stderr

    path = f"{python.parent}:/usr/bin:/bin"
    game = subprocess.Popen(
        [*run, "-r", "restarted"], cwd=folder, env={"PATH": path, "HOME": str(folder)}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    played = folder / "restarted"
    wait_for(lambda: len(list(played.rglob("interactions.json"))) >= 2, 120, "two episodes played")
    restart(servers, signal.SIGTERM, *flags)
    output, _ = game.communicate(timeout=120)
    assert game.returncode == 0, output
    # the terminal says so, once however many calls waited, and the return apart from the call it let through
    assert output.count(f"clemserve at {servers[0].address} is away (") == 1, output
    back = r"is back after (\d+\.\d) s away \(the first call sent to it again then took \d+\.\d s\)"
    assert len(re.findall(back, output)) == 1, output

    calm, restarted = results(folder / "calm"), results(played)
    assert len([name for name in calm if name.endswith("interactions.json")]) == 10
    assert restarted == calm  # all ten episodes, each as without the restart
    assert answered(servers[0]) and answered(servers[1]), "the restart fell mid-run"
