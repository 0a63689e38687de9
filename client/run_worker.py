"""The worker side of ``clemserve run``: a long-lived process that sets up once and plays episode after episode.

This module is what the run's fork server preloads: importing it imports clemcore (without its OpenEnv client,
see ``clemserve.client.run_episodes.defer_openenv``) once, and every worker is forked from that process, so no worker
imports anything. A worker then loads the models (one ResolveModel each) and the callbacks ``clem run`` uses,
and serves its pipe: an ``Episode`` in, an ``Outcome`` out, until the pipe closes. Each game's master is loaded
at the worker's first episode of that game and kept.

Only the coordinator's process imports this module otherwise (to hand ``serve`` to its workers), after its own
import of clemcore.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .run_episodes import LOCK, Episode, Outcome, WorkerConfig, defer_openenv, game_spec

defer_openenv()

from clemcore import backends  # noqa: E402  (after defer_openenv, which keeps gradio and fastmcp out)
from clemcore.backends import Model  # noqa: E402
from clemcore.clemgame import (  # noqa: E402
    ExperimentFileSaver,
    GameBenchmark,
    GameBenchmarkCallbackList,
    GameInstances,
    InstanceFileSaver,
    InteractionsFileSaver,
    ResultsFolder,
)
from clemcore.clemgame.callbacks.files import PlayerFileSaver, SignalFileSaver  # noqa: E402
from clemcore.clemgame.runners import sequential  # noqa: E402
from tqdm import tqdm  # noqa: E402


def serve(connection: Any, config: WorkerConfig, slot: int, calls: Any) -> None:
    """A worker's life: set up, then play each episode the coordinator sends until it sends None or goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which terminates us
    sys.dont_write_bytecode = True  # no __pycache__ in the user's game checkout
    # the runner's (disabled) bar would take a multiprocessing lock: a semaphore that a terminated worker
    # leaves behind, and the resource tracker warns about at Ctrl-C
    tqdm.set_lock(threading.RLock())
    worker: _Worker | None = None
    try:
        worker = _Worker(config, lambda: _add_call(calls, slot))
        failure = ""
    except Exception as exc:  # every episode sent here fails with it; the coordinator goes on
        failure = f"worker could not start: {type(exc).__name__}: {exc}"
    while True:
        try:
            episode = connection.recv()
        except (EOFError, OSError):
            return
        if episode is None:
            return
        try:
            outcome = worker.play(episode) if worker else Outcome(episode, failure)
        except Exception as exc:  # an episode fails alone; the worker goes on with the next
            outcome = Outcome(episode, f"{type(exc).__name__}: {exc}")
        connection.send(outcome)


def _add_call(calls: Any, slot: int) -> None:
    # one writer per slot, no lock: a worker killed mid-update cannot leave a lock held for the coordinator
    calls[slot] += 1


class _Worker:
    def __init__(self, config: WorkerConfig, count_call: Callable[[], None]) -> None:
        _quiet_console()
        self.config = config
        self.models = backends.load_models(backends.ModelSpec.from_strings(config.models), config.gen_args)
        for model in self.models:
            _count_calls(model, count_call)
        results = ResultsFolder(config.results_dir, run_dir=Model.to_identifier(self.models))
        infos = Model.to_infos(self.models)
        # clem run's callbacks, less RunFileSaver (the coordinator keeps run.json)
        self.callbacks = GameBenchmarkCallbackList(
            [
                InstanceFileSaver(results),
                _LockedExperimentFileSaver(results, player_model_infos=infos),
                InteractionsFileSaver(results, player_model_infos=infos),
                PlayerFileSaver(results),
                SignalFileSaver(results),
            ]
        )
        self.games: dict[str, tuple[Any, dict[tuple[str, int], dict[str, Any]]]] = {}
        self.failure = _FailureCapture()
        logging.getLogger("clemcore.clemgame.runners.sequential").addHandler(self.failure)

    def game(self, name: str) -> tuple[Any, dict[tuple[str, int], dict[str, Any]]]:
        if name not in self.games:
            spec = game_spec(self.config.games[name])
            benchmark = GameBenchmark.load_from_spec(spec).__enter__()  # kept for the worker's life
            rows = {
                (row["experiment"]["name"], row["game_instance"]["game_id"]): row
                for row in GameInstances.from_game_spec(spec)
            }
            self.games[name] = (benchmark, rows)
        return self.games[name]

    def play(self, episode: Episode) -> Outcome:
        benchmark, rows = self.game(episode.game)
        row = rows[(episode.experiment, episode.game_id)]
        self.failure.error = None
        sequential.run(benchmark, GameInstances(episode.game, [row]), self.models, callbacks=self.callbacks)
        if episode.complete:
            return Outcome(episode)
        return Outcome(episode, self.failure.error or "no completed.json written (see clembench.log)")


def _quiet_console() -> None:
    """clemcore logs each episode's start to the console; in JOBS workers that buries the progress bar. The
    records still reach clembench.log through the root logger, as clem run's do."""
    for name in ("clemcore.run", "clemcore.cli", "clemcore.backends", "clemcore.clemgame.envs"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console; FileHandler is a subclass and stays
                logger.removeHandler(handler)


class _FailureCapture(logging.Handler):
    """The sequential runner logs, and swallows, an episode's exception: keep its last one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.error = f"{type(exc).__name__}: {exc}"


class _LockedExperimentFileSaver(ExperimentFileSaver):  # type: ignore[misc]
    """clemcore's ExperimentFileSaver writes experiment.json when absent; workers check and write under a lock."""

    def on_game_start(self, game_master: Any, game_instance: dict[str, Any]) -> None:
        with _locked(self.results_folder.to_run_dir_path() / LOCK):
            super().on_game_start(game_master, game_instance)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _count_calls(model: Any, count_call: Callable[[], None]) -> None:
    """Every generate call of the worker's models counts towards the coordinator's calls per second."""

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                count_call()

        return call

    model.generate_response = counted(model.generate_response)
