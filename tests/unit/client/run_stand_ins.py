"""Stand-in workers for ``clemserve run``'s pool: they play nothing, answer as ``run_worker.serve`` does, and
fail or die where the episode's experiment says so. A module of their own: the fork server imports them."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from clemserve.client.retry import Outage
from clemserve.client.run_episodes import COMPLETED, Outcome


def serve(connection: Any, config: Any, slot: int, calls: Any) -> None:
    while True:
        episode = connection.recv()
        if episode is None:
            return
        calls.counted(slot, 5)
        calls.counted(slot, 5)
        episode.folder.mkdir(parents=True, exist_ok=True)
        (episode.folder / "interactions.json").write_text("{}")
        if episode.experiment == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if episode.experiment == "hang":
            time.sleep(60)
        if episode.experiment == "away":  # waits a second for a server that went away
            outage = Outage("s2:2", "connection refused", 60.0, time.monotonic())
            calls.outage(slot, outage)
            time.sleep(1.0)
            outage.reconnected_s = time.monotonic() - outage.since
            calls.outage(slot, outage)
        if episode.experiment == "while-away":  # ends once another worker reports its server away (or in 10 s)
            deadline = time.monotonic() + 10
            while not any(calls.waiting(other) for other in range(len(calls.away_since)) if other != slot):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        if episode.experiment == "fail":
            connection.send(Outcome(episode, f"ValueError: {episode.game_id}"))
            continue
        (episode.folder / COMPLETED).write_text("{}")
        connection.send(Outcome(episode))
