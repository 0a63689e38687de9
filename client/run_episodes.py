"""What ``clemserve run``'s coordinator (``run``) and its workers (``run_worker``) share: the episodes, their
outcomes, the workers' configuration, and clemcore imported without its OpenEnv client. A module of its own so
that the worker module, which the fork server preloads, does not import the coordinator."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spend import Spend

#: clemcore's marker of an episode that finished without an error (SignalFileSaver writes it last)
COMPLETED = "completed.json"
LOCK = ".clemserve-run.lock"


@dataclass(frozen=True)
class Episode:
    """One instance of one experiment of one game, and the folder its results go to."""

    game: str
    experiment: str
    game_id: int
    folder: Path

    def __str__(self) -> str:
        return f"{self.game}/{self.experiment}/{self.folder.name}"

    @property
    def complete(self) -> bool:
        """clemcore wrote completed.json, whole (a worker stopped while writing it leaves it cut short)."""
        try:
            json.loads((self.folder / COMPLETED).read_bytes())
        except (OSError, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Outcome:
    episode: Episode
    error: str | None = None
    #: what the episode's calls spent, by model name (clemserve models only)
    spend: dict[str, Spend] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker sets up from: the models as named on the command line, the generation arguments,
    the results folder, the selected games' specs, and the server of each model where ``--address`` named
    several (``run_servers``; empty: each model's entry says)."""

    models: list[str]
    gen_args: dict[str, Any]
    results_dir: Path
    games: dict[str, dict[str, Any]]
    routes: dict[str, str] = field(default_factory=dict)


#: clemcore modules that ``clemcore.clemgame`` imports for its OpenEnv environment server and client, which
#: bring gradio and fastmcp: seconds of CPU at every start, for classes that playing episodes never uses
_OPENENV = ("clemcore.clemgame.envs.openenv.client", "clemcore.clemgame.envs.openenv.models")


def defer_openenv() -> None:
    """Import clemcore's OpenEnv modules only when something uses a name from them.

    ``clemcore.clemgame`` imports ``ClemGameEnv`` and its models at its own import; in this command's processes
    (the coordinator, the fork server and the workers) they are placeholders that import the real module the
    first time they are called or looked into. Nothing here uses them, so that never happens, and a start
    costs about a second instead of several. The episodes played are the same: the runner, game masters and
    callbacks are clemcore's own.
    """
    for name in _OPENENV:
        if name not in sys.modules:
            sys.modules[name] = _DeferredModule(name)


class _DeferredModule(types.ModuleType):
    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Deferred(self.__name__, attribute)


class _Deferred:
    """A name from a deferred module: the real module is imported at its first use."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    def _real(self) -> Any:
        module, name = self._where
        if isinstance(sys.modules.get(module), _DeferredModule):
            del sys.modules[module]
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self._real(), attribute)


def game_spec(spec: dict[str, Any]) -> Any:
    from clemcore.clemgame import GameSpec

    return GameSpec(**spec)


class GameLoadError(Exception):
    """A game whose master cannot be loaded (a package it imports is missing, an error in its code): its
    episodes fail, the other games are played. The message says what to do."""


def load_game(spec: dict[str, Any]) -> Any:
    """The game's ``GameBenchmark``, loaded as ``clem run`` loads it (close it, or use it in a ``with``, before
    loading another game: helper modules of two games may share a name).

    A master that fails to load leaves nothing behind: clemcore's loader keeps the game's folder on
    ``sys.path`` and the modules imported so far when the master raises, where the next game would find them.
    """
    from clemcore.clemgame import GameBenchmark

    path, modules = list(sys.path), set(sys.modules)
    try:
        return GameBenchmark.load_from_spec(game_spec(spec))
    except Exception as exc:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            del sys.modules[name]
        logging.getLogger(__name__).error("cannot load game %s", spec.get("game_name"), exc_info=True)
        raise GameLoadError(cannot_load(spec, exc)) from exc


def cannot_load(spec: dict[str, Any], exc: BaseException) -> str:
    """Why the game cannot be played, and what to do about it."""
    name = spec.get("game_name", "?")
    cause = f"{name} cannot be loaded: {type(exc).__name__}: {exc}"
    if not isinstance(exc, ImportError):
        return f"{cause} (clembench.log has the traceback)"
    requirements = _requirements(Path(str(spec.get("game_path", "."))))
    install = f"-r {requirements}" if requirements else "-r requirements.txt (in the game checkout)"
    return (
        f"{cause}; the game needs packages this environment lacks: install its checkout's requirements here "
        f"({sys.executable} -m pip install {install})"
    )


def _requirements(game_path: Path) -> Path | None:
    """The requirements file nearest the game: in its folder, else in the checkout above it (clembench keeps
    one at its root for all its games)."""
    for folder in (game_path, *list(game_path.parents)[:2]):
        if (folder / "requirements.txt").is_file():
            return folder / "requirements.txt"
    return None
