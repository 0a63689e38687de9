"""Stand-in workers for ``clemserve run``'s pool: they play nothing, answer as ``run_worker.serve`` does, and
fail or die where the episode's experiment says so. A module of their own: the fork server imports them."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from clemserve.client.run_episodes import COMPLETED, Outcome


def serve(connection: Any, config: Any, slot: int, calls: Any) -> None:
    while True:
        episode = connection.recv()
        if episode is None:
            return
        calls[slot] += 2
        episode.folder.mkdir(parents=True, exist_ok=True)
        (episode.folder / "interactions.json").write_text("{}")
        if episode.experiment == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if episode.experiment == "hang":
            time.sleep(60)
        if episode.experiment == "fail":
            connection.send(Outcome(episode, f"ValueError: {episode.game_id}"))
            continue
        (episode.folder / COMPLETED).write_text("{}")
        connection.send(Outcome(episode))
