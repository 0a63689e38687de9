"""``clemserve run``'s progress display: what it counts, shows and sums up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clemserve.client.run_episodes import COMPLETED, Episode, Outcome
from clemserve.client.run_progress import Progress


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
    assert "done=1 failed=1 calls/s=" in str(progress.bar.postfix)
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
    assert summary.startswith("4 episodes: 2 played, 1 failed, 1 complete before; 10 calls in 2.")
    assert summary.endswith(f"calls/s); results in {tmp_path / 'run'}")
    progress.close()
