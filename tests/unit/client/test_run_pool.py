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


def test_no_episode_starts_while_a_worker_waits_for_a_server(tmp_path: Path) -> None:
    """Every episode plays all the run's models: one started while a server is away would wait too."""
    todo = [
        episode(tmp_path, "away", 0),
        episode(tmp_path, "while-away", 1),
        *(episode(tmp_path, "ok", i) for i in (2, 3)),
    ]
    outcomes: list[Outcome] = []
    with WorkerPool(config(tmp_path), 2, serve) as pool:
        pool.play(todo, outcomes.append, lambda calls: None)
    order = [outcome.episode.game_id for outcome in outcomes]
    # the second worker played episode 1 while the first was there; 2 and 3 waited for the server's return
    assert order[:2] == [1, 0] and sorted(order[2:]) == [2, 3], order
    assert all(outcome.error is None for outcome in outcomes)


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


def test_after_stop_starting_the_episodes_in_flight_finish_and_the_others_are_returned(tmp_path: Path) -> None:
    """A --max-cost cap reached: the first outcome stops the run's feeding, its partner in flight finishes."""
    todo = [episode(tmp_path, "ok", i) for i in range(6)]
    outcomes: list[Outcome] = []
    with WorkerPool(config(tmp_path), 2, serve) as pool:

        def finished(outcome: Outcome) -> None:
            outcomes.append(outcome)
            pool.stop_starting()

        left = pool.play(todo, finished, lambda calls: None)
    assert len(outcomes) == 2 and all(outcome.error is None for outcome in outcomes)
    assert {o.episode for o in outcomes} == set(todo[:2]) and left == todo[2:]
    assert all(e.complete for e in todo[:2]) and not any(e.complete for e in todo[2:])
