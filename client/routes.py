"""Which server plays a model, by its name, without a gateway: a route table from the environment.

``CLEMSERVE_ROUTES="PATTERN=TARGET;PATTERN=TARGET"``, or the same entries one per line in the file that
``CLEMSERVE_ROUTES_FILE`` names (blank lines and ``#`` comments left out); with both, the variable's entries
come first. A pattern is a glob on the model's name as the game asks for it (``fnmatchcase``: ``*``, ``?``,
``[...]``; case-sensitive, as the server's registry matches names); the first entry whose pattern matches
gives the model's server. A target is what ``CLEMSERVE_ADDRESS`` takes, with its port: ``host:port``,
``[::1]:port``, replicas of one server as ``ipv4:A,B``, ``dns:///name:port``, ``unix:path``.

Where a model's calls go, first found wins: the call's own ``address=``, its route, ``connect()``'s address,
``CLEMSERVE_ADDRESS``, localhost:50051. The table is read when a model is created (not at import), so a game
that sets the variable before it asks for its models is routed by it; a bad table raises :class:`RoutesError`
naming the variable or file and the entry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

ROUTES_VARIABLE = "CLEMSERVE_ROUTES"
ROUTES_FILE_VARIABLE = "CLEMSERVE_ROUTES_FILE"
#: the gRPC name resolvers a target may name (``scheme:rest``); anything else is ``host:port``
_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\],/]+):(\d{1,5})$")


class RoutesError(ValueError):
    """The route table cannot be read: the message names the variable or file, and the entry."""


@dataclass(frozen=True)
class Route:
    pattern: str
    target: str

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)


def parse(entries: Sequence[str], source: str) -> list[Route]:
    """``PATTERN=TARGET`` entries (empty ones left out) as routes; ``source`` names each in an error: a
    ``str.format`` pattern given the entry's number (``"CLEMSERVE_ROUTES entry {}"``)."""
    routes = []
    for number, entry in enumerate(entries, 1):
        if not entry.strip():
            continue
        where = f"{source.format(number)} {entry.strip()!r}"
        pattern, equals, target = (part.strip() for part in entry.partition("="))
        if not equals:
            raise RoutesError(f"{where}: no '=': write MODEL_PATTERN=ADDRESS")
        if not pattern:
            raise RoutesError(f"{where}: no model pattern before '='")
        if not target:
            raise RoutesError(f"{where}: no address after '='")
        problem = address_problem(target)
        if problem:
            raise RoutesError(f"{where}: {problem}")
        routes.append(Route(pattern, target))
    return routes


def address_problem(target: str) -> str | None:
    """Why ``target`` is not an address a route can send to (None: it is one)."""
    if re.search(r"\s", target):
        return f"the address {target!r} has a space in it"
    scheme, colon, rest = target.partition(":")
    if colon and scheme in _SCHEMES:
        if not rest.strip("/"):
            return f"the address {target!r} names no server after {scheme}:"
        if scheme == "ipv4":
            bad = [part for part in rest.split(",") if not _HOST_PORT.match(part)]
            return f"the address {target!r} has {bad[0]!r}, not host:port" if bad else None
        return None
    if "," in target:
        return f"the address {target!r} lists several servers: replicas of one server are ipv4:A,B"
    match = _HOST_PORT.match(target)
    if match is None or not 0 < int(match.group(1)) < 65536:
        return f"the address {target!r} is not host:port"
    return None


def read_file(path: str) -> list[Route]:
    """The routes of a ``CLEMSERVE_ROUTES_FILE``: one entry a line, ``#`` to the line's end a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RoutesError(f"{ROUTES_FILE_VARIABLE}: cannot read {path}: {reason}") from None
    lines = [line.partition("#")[0] for line in text.splitlines()]
    return parse(lines, f"{ROUTES_FILE_VARIABLE} {path} line {{}}")


def from_environment(environ: Mapping[str, str] | None = None) -> list[Route]:
    """The route table that ``CLEMSERVE_ROUTES`` and ``CLEMSERVE_ROUTES_FILE`` give, in that order."""
    env = os.environ if environ is None else environ
    routes = parse(env.get(ROUTES_VARIABLE, "").split(";"), f"{ROUTES_VARIABLE} entry {{}}")
    path = env.get(ROUTES_FILE_VARIABLE, "").strip()
    return routes + read_file(path) if path else routes


def target_for(name: str, routes: Sequence[Route]) -> str | None:
    """The target of the first route whose pattern matches ``name``; None where none does."""
    return next((route.target for route in routes if route.matches(name)), None)


def route_for(name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The server the environment's route table sends model ``name`` to; None where no route matches."""
    return target_for(name, from_environment(environ)) if name else None
