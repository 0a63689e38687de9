"""``clemserve run``'s progress display: what it counts, shows and sums up."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from clemserve.client.retry import Outage
from clemserve.client.run_episodes import COMPLETED, Episode, Outcome
from clemserve.client.run_progress import Progress, RunCounters, rate


def episodes(tmp_path: Path, count: int, complete: int) -> list[Episode]:
    found = []
    for index in range(count):
        folder = tmp_path / "game" / "exp" / f"instance_{index:05d}"
        folder.mkdir(parents=True)
        if index < complete:
            (folder / COMPLETED).write_text("{}")
        found.append(Episode("game", "exp", index, folder))
    return found


def test_episodes_complete_before_are_counted_as_done_and_not_to_play(tmp_path: Path) -> None:
    progress = Progress(episodes(tmp_path, 5, complete=2))
    assert (progress.skipped, progress.done, progress.todo, progress.failed) == (2, 2, 3, 0)
    assert (progress.bar.n, progress.bar.total) == (2, 5)
    progress.close()


def test_outcomes_move_the_bar_and_failures_are_shown_as_they_come(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    played = episodes(tmp_path, 3, complete=0)
    progress = Progress(played)
    progress.finished(Outcome(played[0]))
    progress.finished(Outcome(played[1], "worker process killed by SIGKILL"))
    assert (progress.done, progress.failed, progress.bar.n) == (1, 1, 2)
    assert "failed: game/exp/instance_00001: worker process killed by SIGKILL" in capsys.readouterr().err
    progress.show(7)
    assert progress.calls == 7
    assert "done=1 failed=1 " in str(progress.bar.postfix) and " calls/" in str(progress.bar.postfix)
    progress.close()


def test_calls_per_second_and_the_summary(tmp_path: Path) -> None:
    played = episodes(tmp_path, 4, complete=1)
    progress = Progress(played, started=time.monotonic() - 2.0)
    progress.finished(Outcome(played[1]))
    progress.finished(Outcome(played[2]))
    progress.finished(Outcome(played[3], "boom"))
    progress.calls = 10
    assert progress.calls_per_second() == pytest.approx(5.0, rel=0.1)
    summary = progress.summary(tmp_path / "run")
    assert summary.startswith("4 episodes: 2 played, 1 failed, 1 complete before; 10 calls (0 tokens) in 2.")
    assert summary.endswith(f"(5.0 calls/s, 0.0 tokens/min); results in {tmp_path / 'run'}")
    progress.close()


def test_a_rate_reads_at_every_speed() -> None:
    assert rate(10, 2.0, "calls") == "5.0 calls/s"
    assert rate(3, 60.0, "calls") == "3.0 calls/min"  # not "0.1 calls/s", which a slow model makes "0.0"
    assert rate(0, 5.0, "tokens") == "0.0 tokens/min"


def counters(jobs: int = 2) -> RunCounters:
    return RunCounters(multiprocessing.get_context(), jobs)


def test_the_line_shows_calls_and_tokens_the_workers_counted(tmp_path: Path) -> None:
    shared = counters()
    progress = Progress(episodes(tmp_path, 2, complete=0), started=time.monotonic() - 60.0)
    progress.watch(shared)
    shared.counted(0, 300)
    shared.counted(1, 240)
    progress.show(shared.total_calls())
    assert (progress.calls, progress.tokens) == (2, 540)
    assert "done=0 failed=0 2.0 calls/min, 9.0 tokens/s" in str(progress.bar.postfix)
    progress.close()


def away(since: float) -> Outage:
    return Outage("h:1", "connection refused", 60.0, since)


def back(since: float, reconnected_s: float, call_s: float) -> Outage:
    outage = away(since)
    outage.reconnected_s, outage.call_s = reconnected_s, call_s
    return outage


def test_the_line_says_the_server_is_away_and_for_how_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    shared = counters()
    progress = Progress(episodes(tmp_path, 2, complete=0))
    progress.watch(shared)
    now = time.monotonic()
    shared.outage(0, away(now - 12.4))
    shared.outage(1, away(now - 3.0))  # a second worker finds the same outage later
    progress.show(0)
    assert str(progress.bar.postfix).endswith("| server away 12 s")
    assert "back after" not in capsys.readouterr().err

    shared.outage(1, back(now - 3.0, reconnected_s=1.0, call_s=5.0))  # back at now - 2: the first worker waits on
    progress.show(0)
    assert "server away" in str(progress.bar.postfix)
    shared.outage(0, back(now - 12.4, reconnected_s=10.6, call_s=8.0))  # back at now - 1.8
    with caplog.at_level(logging.WARNING):
        progress.show(0)
    assert "server away" not in str(progress.bar.postfix)
    line = "clemserve back after 10.4 s away (the first call sent to it again then took 5.0 s)"
    assert line in capsys.readouterr().err  # the earliest return: worker 1's, 2 s ago
    assert line in caplog.text  # and the run's log
    progress.show(0)
    assert "back after" not in capsys.readouterr().err  # said once
    progress.close()


def test_the_line_names_the_server_away_among_several(tmp_path: Path) -> None:
    shared = RunCounters(multiprocessing.get_context(), 3, ("s1:1", "h:1"))
    progress = Progress(episodes(tmp_path, 2, complete=0))
    progress.watch(shared)
    shared.outage(1, away(time.monotonic() - 7.2))  # away() is h:1's outage
    progress.show(0)
    assert str(progress.bar.postfix).endswith("| server h:1 away 7 s")
    assert shared.waiting(1) and not shared.waiting(0)
    shared.outage(2, Outage("s1:1", "connection refused", 60.0, time.monotonic()))
    progress.show(0)
    assert "| servers s1:1, h:1 away 7 s" in str(progress.bar.postfix)
    progress.close()


def test_a_worker_that_takes_a_dead_ones_slot_does_not_inherit_its_outage(tmp_path: Path) -> None:
    shared = counters(1)
    shared.outage(0, away(time.monotonic() - 5))
    assert shared.away_since_earliest() is not None
    shared.started(0)
    assert shared.away_since_earliest() is None


def test_each_cause_of_failure_is_shown_once_and_episodes_not_played_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    played = episodes(tmp_path, 5, complete=0)
    progress = Progress(played)
    for episode in played[:3]:  # a missing key fails every episode the same way
        progress.finished(Outcome(episode, "FailedPreconditionError: no api_key"))
    progress.not_played(2)  # a game that cannot be loaded: the run says why
    progress.close()
    said = capsys.readouterr().err
    assert said.count("no api_key") == 1 and "failed: game/exp/instance_00000: FailedPreconditionError" in said
    assert (progress.failed, progress.bar.n) == (5, 5)
