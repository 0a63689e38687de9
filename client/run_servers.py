"""``clemserve run`` across servers, each with its own models: which server plays each model of the run, and the
run's models loaded there.

Without ``--address``, each model plays where its clemcore registry entry says (``model_config.clemserve_address``,
written by ``clemserve clemcore-setup``), as ``clem run`` plays it; ``CLEMSERVE_ADDRESS`` or one ``--address``
sends every model to that one server (or to its replicas: ``ipv4:A,B`` is one server). With ``--address``
repeated, the servers are asked once, at the start and all at once (ResolveModel), which of them has each model:
a model goes to the first server, in the order given, that resolves it, and a model that more than one has is
said on stderr. A model that none has stops the run before it starts.

A worker loads each model with its server as ``CLEMSERVE_ADDRESS`` (its process's environment, for that load
only): the clemserve backend that clemcore-setup copied into the working directory reads it there, whichever
version of it was copied.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clemserve.registry.errors import ClemserveError, ModelNotFoundError

#: ResolveModel: (selector, address) -> the server's entry; raises ModelNotFoundError where it has none
Resolve = Callable[[Any, str], Any]


class NotServedError(Exception):
    """A model of the run that no server named has (the message names the model and the servers asked)."""


def servers_named(args: argparse.Namespace) -> list[str]:
    """The servers that ``--address`` repeated names (two or more, in the order given), whose models the run
    routes; ``[]`` otherwise: a single ``--address``, given once or repeated, stays ``args.address`` as before,
    and with several ``args.address`` becomes None (no one address for every model)."""
    given = getattr(args, "address", None)
    if not isinstance(given, list):
        return []
    servers = list(dict.fromkeys(given))
    args.address = servers[0] if len(servers) == 1 else None
    return servers if len(servers) > 1 else []


def route(models: Sequence[str], servers: Sequence[str], resolve: Resolve | None = None) -> dict[str, str]:
    """Each model (as named on the command line: a name or a JSON selector) with the first of ``servers`` that
    resolves it. A model on more than one server is said on stderr; one on none raises NotServedError, or the
    error of a server that did not answer (it may be the one that has it)."""
    ask = resolve or _resolve
    asked = [(model, server) for model in dict.fromkeys(models) for server in servers]
    with ThreadPoolExecutor(max_workers=min(len(asked), 16)) as pool:
        answers = dict(zip(asked, pool.map(lambda pair: _answer(ask, *pair), asked), strict=True))
    routes = {}
    for model in dict.fromkeys(models):
        having = [server for server in servers if answers[(model, server)] is None]
        if having:
            routes[model] = having[0]
            if len(having) > 1:
                where = ", ".join(having)
                print(
                    f"note: {model} is on {len(having)} servers ({where}): the run plays it on {having[0]}",
                    file=sys.stderr,
                )
            continue
        errors = [answers[(model, server)] for server in servers]
        other = next((error for error in errors if not isinstance(error, ModelNotFoundError)), None)
        if other is not None:
            raise other
        raise NotServedError(f"model {model} is on none of the servers named with --address: {', '.join(servers)}")
    return routes


def _answer(resolve: Resolve, model: str, server: str) -> ClemserveError | None:
    """None where ``server`` has ``model``, else why not."""
    try:
        resolve(_selector(model), server)
    except ClemserveError as exc:
        return exc
    return None


def _selector(model: str) -> Any:
    """A model as clemcore takes it on the command line: a name, or a JSON selector."""
    return json.loads(model) if model.lstrip().startswith("{") else model


def _resolve(selector: Any, address: str) -> Any:
    from .model import resolve

    return resolve(selector, address=address, timeout=30)


def load_models(models: Sequence[str], gen_args: Mapping[str, Any], routes: Mapping[str, str]) -> list[Any]:
    """clemcore's ``load_models`` for the run's models (as named on the command line), each loaded with its
    server from ``routes`` as ``CLEMSERVE_ADDRESS``; without routes, clemcore's own call, unchanged."""
    from clemcore import backends

    specs = backends.ModelSpec.from_strings(list(models))
    if not routes:
        return list(backends.load_models(specs, dict(gen_args)))
    loaded = []
    for model, spec in zip(models, specs, strict=True):
        with _address(routes[model]):
            loaded.extend(backends.load_models([spec], dict(gen_args)))
    return loaded


@contextlib.contextmanager
def _address(address: str) -> Iterator[None]:
    before = os.environ.get("CLEMSERVE_ADDRESS")
    os.environ["CLEMSERVE_ADDRESS"] = address
    try:
        yield
    finally:
        if before is None:
            del os.environ["CLEMSERVE_ADDRESS"]
        else:
            os.environ["CLEMSERVE_ADDRESS"] = before


def servers_of(models: Sequence[Any]) -> list[str]:
    """The servers the loaded models play on, in the models' order (a model clemserve does not play has none)."""
    found = (getattr(getattr(model, "remote", None), "address", None) for model in models)
    return list(dict.fromkeys(address for address in found if address))
