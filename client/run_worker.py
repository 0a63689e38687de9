"""The worker side of ``clemserve run``: a long-lived process that sets up once and plays episode after episode.

This module is what the run's fork server preloads: importing it imports clemcore (without its OpenEnv client,
see ``clemserve.client.run_episodes.defer_openenv``) once, and every worker is forked from that process, so no worker
imports anything. A worker then loads the models (one ResolveModel each) and the callbacks ``clem run`` uses,
and serves its pipe: an ``Episode`` in, an ``Outcome`` out, until the pipe closes. A game's master is loaded
at the worker's first episode of that game, and closed when an episode of another game comes.

Only the coordinator's process imports this module otherwise (to hand ``serve`` to its workers), after its own
import of clemcore.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .retry import print_outage, unwatch_outages, watch_outages
from .run_episodes import (
    LOCK,
    Episode,
    GameLoadError,
    Outcome,
    WorkerConfig,
    defer_openenv,
    game_spec,
    load_game,
)
from .run_servers import load_models
from .spend import Spend

defer_openenv()

from clemcore.backends import Model  # noqa: E402  (after defer_openenv, which keeps gradio and fastmcp out)
from clemcore.clemgame import (  # noqa: E402
    ExperimentFileSaver,
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
    calls.started(slot)
    watch_outages(functools.partial(calls.outage, slot))  # the coordinator's progress line shows them
    try:
        worker = _Worker(config, functools.partial(calls.counted, slot))
        unwatch_outages(print_outage)  # the clemserve backend's terminal lines, which JOBS workers would repeat
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
        except GameLoadError as exc:  # its message says what to do
            outcome = Outcome(episode, str(exc))
        except Exception as exc:  # an episode fails alone; the worker goes on with the next
            outcome = Outcome(episode, f"{type(exc).__name__}: {exc}")
        connection.send(outcome)


class _Worker:
    def __init__(self, config: WorkerConfig, count_call: Callable[[int], None]) -> None:
        _quiet_console()
        self.config = config
        self.models = load_models(config.models, config.gen_args, config.routes)  # each on its server
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
        self.benchmark: Any = None  # the game of the last episode, loaded
        self.rows: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        self.failure = _FailureCapture()
        logging.getLogger("clemcore.clemgame.runners.sequential").addHandler(self.failure)

    def game(self, name: str) -> tuple[Any, dict[tuple[str, int], dict[str, Any]]]:
        """The game's benchmark and its instances by (experiment, game id). One game is loaded at a time, as
        ``clem run`` loads them: two games' helper modules may share a name (the episodes come game by game,
        so a worker changes games a few times a run)."""
        if self.benchmark is None or self.benchmark.game_name != name:
            if self.benchmark is not None:
                self.benchmark.close()  # its helper modules leave sys.modules
                self.benchmark = None
            self.benchmark = load_game(self.config.games[name])
        if name not in self.rows:
            self.rows[name] = {
                (row["experiment"]["name"], row["game_instance"]["game_id"]): row
                for row in GameInstances.from_game_spec(game_spec(self.config.games[name]))
            }
        return self.benchmark, self.rows[name]

    def play(self, episode: Episode) -> Outcome:
        benchmark, rows = self.game(episode.game)
        row = rows[(episode.experiment, episode.game_id)]
        self.failure.error = None
        before = self.spent()
        sequential.run(benchmark, GameInstances(episode.game, [row]), self.models, callbacks=self.callbacks)
        after = self.spent()
        spend = {name: after[name] - before.get(name, Spend()) for name in after}
        if episode.complete:
            return Outcome(episode, spend=spend)
        return Outcome(episode, self.failure.error or "no completed.json written (see clembench.log)", spend)

    def spent(self) -> dict[str, Spend]:
        """What the clemserve models spent so far, by name (two players of one model summed)."""
        found: dict[str, Spend] = {}
        remotes = {
            id(remote): (model.name, remote) for model in self.models if (remote := getattr(model, "remote", None))
        }
        for name, remote in remotes.values():  # one model object playing both roles counts once
            found[name] = found.get(name, Spend()) + remote.spent
        return found


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


def _count_calls(model: Any, count_call: Callable[[int], None]) -> None:
    """Every generate call of the worker's models counts towards the coordinator's calls and tokens per second
    (told the tokens the call generated: a clemserve model's client counts them, other models none)."""
    remote = getattr(model, "remote", None)

    def tokens() -> int:
        return int(getattr(remote, "tokens_generated", 0))

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            before = tokens()
            try:
                return method(*args, **kwargs)
            finally:
                count_call(tokens() - before)

        return call

    model.generate_response = counted(model.generate_response)
