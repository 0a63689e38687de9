"""``clemserve run``'s progress display: episodes done, failed and left, calls per second and an ETA on
stderr, and the summary at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .run_episodes import Episode, Outcome


@dataclass
class Progress:
    """Episodes done/failed/total, calls per second and an ETA on stderr (tqdm, which clemcore brings)."""

    episodes: list[Episode]
    failed: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    calls: int = 0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.skipped = sum(episode.complete for episode in self.episodes)
        self.done = self.skipped
        self.bar = tqdm(
            total=len(self.episodes), initial=self.skipped, desc="episodes", unit="ep", mininterval=0.5, file=sys.stderr
        )
        self._postfix()

    @property
    def todo(self) -> int:
        return len(self.episodes) - self.skipped

    def show(self, calls: int) -> None:
        self.calls = calls
        self._postfix()

    def finished(self, outcome: Outcome) -> None:
        if outcome.error is None:
            self.done += 1
        else:
            self.failed += 1
            self.bar.write(f"failed: {outcome.episode}: {outcome.error}", file=sys.stderr)
        self.bar.update(1)
        self._postfix()

    def calls_per_second(self) -> float:
        return self.calls / max(time.monotonic() - self.started, 1e-9)

    def _postfix(self) -> None:
        self.bar.set_postfix_str(
            f"done={self.done} failed={self.failed} calls/s={self.calls_per_second():.1f}", refresh=True
        )

    def close(self) -> None:
        self.bar.close()

    def summary(self, run_dir: Path) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"{len(self.episodes)} episodes: {self.done - self.skipped} played, {self.failed} failed, "
            f"{self.skipped} complete before; {self.calls} calls in {seconds:.1f} s "
            f"({self.calls_per_second():.1f} calls/s); results in {run_dir}"
        )
