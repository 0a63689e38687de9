"""Rate limits held by the server: ``clemserve run -j 64`` against a provider that takes 8 calls at once and
answers 429 (with a Retry-After) above that finishes every episode, with few 429s and the provider kept busy.

The server's limit says 10, more than the provider takes, so the server has to find the provider's limit from
its 429s (service/backends/rate_limits.py). The episodes are hellogame's (one call each), played on the game
machine's environment (.venv-clemcore) with the games from ../shared.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.remote.conftest import RETRY_FLAGS, all_keys
from tests.integration.test_clemcore import clemcore_python, game_side
from tests.providers import ConcurrencyCap, openai_reply
from tests.serving import REPO, ServerPool, ServerProcess
from tests.standin import StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
ENTRIES = [{"model_name": "gpt-capped", "backend": "openai", "model_id": "gpt-4o-mini"}]
PROVIDER_LIMIT = 8
ANSWER_S = 0.25
EPISODES = 160
JOBS = 64


@pytest.fixture
def provider(standin: StandIn) -> Iterator[ConcurrencyCap]:
    """The stand-in as a provider that takes 8 calls at once; cleared after the test, whose hundreds of
    requests a module fixture of the next module would otherwise see before the autouse clearing."""
    cap = ConcurrencyCap(openai_reply("GREET: Hello, welcome!"), PROVIDER_LIMIT, ANSWER_S)
    standin.script("POST", r"/chat/completions$", cap)
    yield cap
    standin.clear()


@pytest.fixture(scope="module")
def limited_server(
    server_pool: ServerPool, remote_registry: Path, standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    key_file = tmp_path_factory.mktemp("limited-keys") / "key.json"
    key_file.write_text(json.dumps(all_keys(standin.url)))
    flags = ("--key-file", str(key_file), *RETRY_FLAGS, "--rate-limit", "openai=concurrency:10")
    return server_pool(remote_registry, *flags)


def many_episodes(folder: Path, episodes: int) -> None:
    """hellogame copied into ``folder`` with an instances file ``many``: its ten instances, repeated."""
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    game = shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    instances = json.loads((game / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    ten = experiment["game_instances"]
    experiment["game_instances"] = [{**ten[i % len(ten)], "game_id": i} for i in range(episodes)]
    (game / "in" / "many.json").write_text(json.dumps(instances))


def test_clemserve_run_j64_waits_in_the_servers_queue_instead_of_failing_on_429s(
    limited_server: ServerProcess, provider: ConcurrencyCap, tmp_path: Path
) -> None:
    python = clemcore_python()
    many_episodes(tmp_path, EPISODES)
    clemserve = str(python.parent / "clemserve")
    setup = game_side(python, [clemserve, "clemcore-setup", "--address", limited_server.address], tmp_path)
    assert setup.returncode == 0, setup.stderr

    started = time.monotonic()
    run = game_side(
        python, [clemserve, "run", "-g", "hellogame", "-i", "many", "-m", "gpt-capped", "-j", str(JOBS)], tmp_path
    )
    wall = time.monotonic() - started

    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(list((tmp_path / "results").rglob("interactions.json"))) == EPISODES
    assert provider.answered == EPISODES and provider.most_at_once <= PROVIDER_LIMIT
    assert provider.refused_share <= 0.05, (provider.refused, provider.answered)
    # the provider's work, from its first call to its last answer (the run's wall time adds the start of 64
    # clemcore workers, which no rate limit changes)
    ideal = EPISODES * ANSWER_S / PROVIDER_LIMIT
    assert provider.busy_s <= 1.5 * ideal, (provider.busy_s, ideal, wall)
