"""``clemserve run``'s worker pool with stand-in workers (no clemcore): episodes handed out, outcomes back, a
dead worker's episode failed and its slot refilled, Ctrl-C's cancel."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from clemserve.client.run_episodes import Episode, Outcome, WorkerConfig
from clemserve.client.run_pool import WorkerPool, _death
from tests.unit.client.run_stand_ins import serve


def config(tmp_path: Path) -> WorkerConfig:
    return WorkerConfig(["mock"], {"temperature": 0.0}, tmp_path, {})


def episode(tmp_path: Path, experiment: str, game_id: int) -> Episode:
    return Episode("game", experiment, game_id, tmp_path / "game" / experiment / f"instance_{game_id:05d}")


def test_every_episode_is_played_and_a_dead_worker_fails_only_its_own(tmp_path: Path) -> None:
    todo = [episode(tmp_path, "ok", i) for i in range(4)]
    todo[1] = episode(tmp_path, "die", 1)
    todo[2] = episode(tmp_path, "fail", 2)
    stale = todo[0].folder / "requests.json"  # what an earlier, interrupted try left
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    outcomes: list[Outcome] = []
    shown: list[int] = []
    with WorkerPool(config(tmp_path), 2, serve) as pool:
        pool.play(todo, outcomes.append, shown.append)
        calls = pool.calls_made()
    by_id = {outcome.episode.game_id: outcome.error for outcome in outcomes}
    assert sorted(by_id) == [0, 1, 2, 3]
    assert by_id[0] is None and by_id[3] is None
    assert by_id[2] == "ValueError: 2"
    assert by_id[1] is not None and "killed by SIGKILL" in by_id[1]
    assert not todo[1].folder.exists()  # what the dead worker wrote was cut short
    assert todo[0].complete and not stale.exists()
    assert calls == 8 and shown and shown[-1] <= calls
    assert pool.slots == [None, None]  # every worker stopped


def test_cancel_stops_the_workers_and_removes_what_they_had_not_completed(tmp_path: Path) -> None:
    class Interrupted(Exception):
        pass

    hanging = episode(tmp_path, "hang", 0)

    def interrupt(calls: int) -> None:
        if calls:  # the worker has the episode
            raise Interrupted

    with WorkerPool(config(tmp_path), 1, serve) as pool:
        with pytest.raises(Interrupted):
            pool.play([hanging], lambda outcome: None, interrupt)
        assert pool.cancel() == [hanging]
    assert not hanging.folder.exists()


@pytest.mark.parametrize(
    ("exitcode", "says"),
    [
        (-signal.SIGKILL, "worker process killed by SIGKILL (the out-of-memory killer sends it, as does kill -9)"),
        (-signal.SIGSEGV, "worker process killed by SIGSEGV"),
        (3, "worker process exited with code 3 while playing it"),
    ],
)
def test_a_workers_death_in_words(exitcode: int, says: str) -> None:
    assert _death(exitcode) == says
