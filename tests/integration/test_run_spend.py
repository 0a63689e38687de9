"""``clemserve run`` keeps what a run spent: per model, game and experiment in clemserve.json and in its closing
summary, a resumed run adding to what its first part spent; and ``clemserve models`` shows the server's totals.
The model is a paid one (openai) answered by a provider stand-in; its price is genai-prices', computed here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from tests.integration.test_clemcore import clemcore_python, game_side
from tests.providers import FAKE_KEYS, openai_reply, openai_usage
from tests.serving import REPO, ServerPool, ServerProcess
from tests.standin import Reply, StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
CHAT = r"^/chat/completions$"
EPISODES = 3
#: every call's usage: 50 prompt tokens (32 cached), 10 completion tokens
USAGE = openai_usage(50, 10, cached=32)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        server.script("POST", CHAT, lambda _: Reply(200, openai_reply("Hello!", USAGE)))
        yield server


@pytest.fixture(scope="module")
def paid_server(server_pool: ServerPool, standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    folder = tmp_path_factory.mktemp("run-spend")
    (folder / "registry.json").write_text(
        json.dumps([{"model_name": "run-gpt", "backend": "openai", "model_id": "gpt-4o-mini"}])
    )
    (folder / "key.json").write_text(json.dumps({"openai": {"api_key": FAKE_KEYS["openai"], "base_url": standin.url}}))
    return server_pool(folder / "registry.json", "--key-file", str(folder / "key.json"))


@pytest.fixture(scope="module")
def workdir(paid_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    folder = tmp_path_factory.mktemp("run-spend-game")
    shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    instances = json.loads((folder / "hellogame" / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    (folder / "hellogame" / "in" / "three.json").write_text(json.dumps(instances))
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", paid_server.address], folder
    )
    assert setup.returncode == 0, setup.stderr
    return python, folder


def call_usd() -> float:
    usage = Usage(input_tokens=50, output_tokens=10, cache_read_tokens=32)
    return float(calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price)


def spend_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "clemserve.json").read_text())["spend"])


def test_a_run_records_its_spend_and_a_resumed_run_adds_to_it(
    workdir: tuple[Path, Path], standin: StandIn, paid_server: ServerProcess
) -> None:
    python, folder = workdir
    command = [str(python.parent / "clemserve"), "run", "-g", "hellogame", "-i", "three", "-m", "run-gpt", "-j", "2"]
    calls_before = len(list(standin.matching(CHAT)))
    first = game_side(python, [*command, "-r", "spend"], folder)
    assert first.returncode == 0, first.stdout + first.stderr
    calls = len(list(standin.matching(CHAT))) - calls_before
    assert calls >= EPISODES
    run_dir = folder / "spend" / "run-gpt"
    spend = spend_of(run_dir)
    model = spend["by_model"]["run-gpt"]
    assert (model["calls"], model["prompt_tokens"], model["cached_prompt_tokens"]) == (calls, 50 * calls, 32 * calls)
    assert model["cost_usd"] == pytest.approx(calls * call_usd()) and model["cost_usd"] > 0
    assert spend["by_game"]["run-gpt"]["hellogame"]["calls"] == calls
    assert spend["by_experiment"]["run-gpt"]["hellogame"]["greet_en"]["calls"] == calls
    assert spend["total"]["cost_usd"] == pytest.approx(model["cost_usd"])
    assert f"run-gpt: {calls} calls" in first.stdout and "  hellogame: " in first.stdout

    # an episode to play again: the resumed run plays it alone, and adds its calls to the first part's
    replayed = sorted((run_dir / "hellogame" / "greet_en").glob("instance_*"))[0]
    shutil.rmtree(replayed)
    calls_before = len(list(standin.matching(CHAT)))
    resumed = game_side(python, [*command, "-r", "spend"], folder)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"1 played, 0 failed, {EPISODES - 1} complete before" in resumed.stdout
    more = len(list(standin.matching(CHAT))) - calls_before
    assert more >= 1
    again = spend_of(run_dir)["by_model"]["run-gpt"]
    assert again["calls"] == calls + more
    assert again["cost_usd"] == pytest.approx((calls + more) * call_usd())

    # the server's totals per model, as a plain clem run would find them
    models = game_side(python, [str(python.parent / "clemserve"), "models", "--address", paid_server.address], folder)
    assert models.returncode == 0, models.stderr
    header, *rows = [line.split() for line in models.stdout.splitlines()]
    assert "SPENT" in header
    row = next(row for row in rows if row[0] == "run-gpt")
    assert row[11] == f"${again['cost_usd']:.4f}", models.stdout  # the 12th column (header names have spaces)
