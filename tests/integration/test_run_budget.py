"""``clemserve run --max-cost`` stops cleanly: once the run's spend reaches the cap no new episode starts, the
episodes in flight finish, the run exits 5 and prints the command that resumes it with a higher cap, and that
command plays the rest (the first part's spend counting toward the cap). A model the server cannot price
makes ``--max-cost`` refuse to start. The model is a stand-in provider's, priced by its registry entry."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_clemcore import clemcore_python, game_side
from tests.providers import FAKE_KEYS, openai_reply, openai_usage
from tests.serving import REPO, ServerPool, ServerProcess
from tests.standin import Reply, StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
CHAT = r"^/chat/completions$"
EPISODES = 6
JOBS = 3
#: a tenth of a cent per token; every call (one per hellogame episode) 50 + 10 tokens: $0.06
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
CALL_USD = 0.06
ENTRIES = [
    {"model_name": "budget-run", "backend": "openai_compatible", "model_id": "m", "model_config": {"price": PRICE}},
    {"model_name": "budget-free", "backend": "openai_compatible", "model_id": "m"},
]


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        server.script("POST", CHAT, lambda _: Reply(200, openai_reply("Hello!", openai_usage(50, 10))))
        yield server


@pytest.fixture(scope="module")
def priced_server(server_pool: ServerPool, standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    folder = tmp_path_factory.mktemp("run-budget")
    (folder / "registry.json").write_text(json.dumps(ENTRIES))
    key = {"openai_compatible": {"api_key": FAKE_KEYS["openai_compatible"], "base_url": standin.url}}
    (folder / "key.json").write_text(json.dumps(key))
    return server_pool(folder / "registry.json", "--key-file", str(folder / "key.json"))


@pytest.fixture(scope="module")
def workdir(priced_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    folder = tmp_path_factory.mktemp("run-budget-game")
    shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    instances = json.loads((folder / "hellogame" / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    (folder / "hellogame" / "in" / "six.json").write_text(json.dumps(instances))
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", priced_server.address], folder
    )
    assert setup.returncode == 0, setup.stderr
    return python, folder


def complete(run_dir: Path) -> int:
    return len(list(run_dir.glob("hellogame/*/instance_*/completed.json")))


def test_a_reached_cap_lets_the_episodes_in_flight_finish_starts_no_other_and_says_how_to_resume(
    workdir: tuple[Path, Path], standin: StandIn
) -> None:
    python, folder = workdir
    clemserve = str(python.parent / "clemserve")
    command = [clemserve, "run", "-g", "hellogame", "-i", "six", "-m", "budget-run", "-j", str(JOBS), "-r", "capped"]
    before = len(list(standin.matching(CHAT)))
    first = game_side(python, [*command, "--max-cost", "0.05"], folder)
    assert first.returncode == 5, first.stdout + first.stderr
    # the first episode to end reached the cap: the other two in flight finished, the other three never started
    run_dir = folder / "capped" / "budget-run"
    assert complete(run_dir) == JOBS
    assert len(list(standin.matching(CHAT))) - before == JOBS
    spent = json.loads((run_dir / "clemserve.json").read_text())["spend"]["total"]["cost_usd"]
    assert spent == pytest.approx(JOBS * CALL_USD)
    assert "budget reached: the run spent $0.1800, reaching --max-cost 0.05" in first.stdout
    assert f"{EPISODES - JOBS} were not started" in first.stdout
    lines = first.stdout.splitlines()
    resume = lines[next(i for i, line in enumerate(lines) if line.startswith("resume with higher caps")) + 1]
    argv = shlex.split(resume)
    assert argv == ["clemserve", *command[1:], "--max-cost", "0.23"]  # what was spent plus the cap again

    # the same cap again: what the first part spent counts, so nothing starts
    calls = len(list(standin.matching(CHAT)))
    again = game_side(python, [*command, "--max-cost", "0.05"], folder)
    assert again.returncode == 5, again.stdout + again.stderr
    assert f"{EPISODES - JOBS} were not started" in again.stdout
    assert len(list(standin.matching(CHAT))) == calls and complete(run_dir) == JOBS

    second = game_side(python, [clemserve, *argv[1:]], folder)
    assert second.returncode == 0, second.stdout + second.stderr
    assert complete(run_dir) == EPISODES
    assert f"{EPISODES - JOBS} played, 0 failed, {JOBS} complete before" in second.stdout
    total = json.loads((run_dir / "clemserve.json").read_text())["spend"]["total"]["cost_usd"]
    assert total == pytest.approx(EPISODES * CALL_USD)


def test_a_cap_over_a_model_the_server_cannot_price_refuses_to_start(
    workdir: tuple[Path, Path], standin: StandIn
) -> None:
    python, folder = workdir
    before = len(list(standin.matching(CHAT)))
    command = [str(python.parent / "clemserve"), "run", "-g", "hellogame", "-i", "six", "-m", "budget-free"]
    refused = game_side(python, [*command, "-r", "unpriced", "--max-cost", "1"], folder)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--max-cost: the server cannot price budget-free: backend openai_compatible has no price list" in (
        refused.stderr
    )
    assert "--allow-unpriced" in refused.stderr
    assert len(list(standin.matching(CHAT))) == before
