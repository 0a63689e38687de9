"""``clemserve clemcore-setup``: a clemcore working directory whose models are clemserve servers'.

clemcore finds backends as ``<name>_api.py`` files and models in ``model_registry.json``, both in its working
directory. This writes ``clemserve_api.py`` (a copy of ``clemserve.client.clemcore_backend``) and merges one
entry per server model into ``model_registry.json``, recording the server's address in the entry. Each server
(``--address``, repeatable; or one run per server) replaces its own entries only, so the models of several
servers, each with its own models, live side by side. Like the other operator commands (``commands``) it is
a client and needs the client's dependencies only: it runs on the game machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .commands import EXIT_OK, EXIT_USAGE, add_connection_flags, report

BACKEND = "clemserve"
BACKEND_FILE = f"{BACKEND}_api.py"
REGISTRY_FILE = "model_registry.json"
#: what of a server entry stays on the server: its backend and that backend's configuration; clemcore
#: tags every entry with the file it read it from, so the server's own tag is dropped too
SERVER_ONLY = ("backend", "model_config", "lookup_source")


class SetupError(Exception):
    """The directory cannot be set up as it is (no such directory, an unreadable registry)."""


def add_parser(commands: Any, environ: Mapping[str, str]) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "clemcore-setup",
        help="prepare a clemcore working directory to play the server's models",
        description=(
            f"Write {BACKEND_FILE} (a clemcore backend that forwards to clemserve) into DIR and add an entry per "
            f'server model, with "backend": "{BACKEND}", to {REGISTRY_FILE} there. An existing {REGISTRY_FILE} '
            f"is merged, not replaced: entries of other backends are kept, in their order and ahead of the "
            f"server's (so they win a name clash), and so are the {BACKEND} entries of other servers; only the "
            f"earlier entries of the same address are replaced, in their place. --address may be repeated for "
            f"several servers, each with its own models (replicas of one server are one address, ipv4:A,B): a "
            f"name that two servers hold is played on the one whose entry comes first. The address is recorded "
            f"in each entry's model_config.clemserve_address; CLEMSERVE_ADDRESS overrides it when games run. Only "
            f"the models the server can run are added (as `clemserve models --available` lists them), so that "
            f"`clem list models` shows what can be played; --all adds every one. Run clem (clemcore's CLI) in DIR "
            f"afterwards."
        ),
    )
    parser.add_argument(
        "--all", action="store_true", help="add every server model, also those it cannot run now (no key, ...)"
    )
    add_connection_flags(parser, environ, several=True)
    parser.add_argument(
        "dir", nargs="?", default=".", metavar="DIR", help="the clemcore working directory (default: .)"
    )


def run(args: argparse.Namespace) -> int:
    from .admin import list_servers

    directory = Path(args.dir)
    addresses: list[str] = args.addresses  # connect() fills it in: every --address given
    try:
        existing = read_registry(directory)
    except SetupError as exc:
        print(f"clemserve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    listings = list_servers(addresses, timeout=args.timeout)
    failed = [listing.error for listing in listings if listing.error is not None]
    if failed:  # nothing is written: a server that did not answer would lose its entries
        return max(report(error) for error in failed)
    entries: list[dict[str, Any]] = []
    for listing in listings:
        # a server too old to say (unknown) is taken at its word that its models run
        playable = [s for s in listing.models if args.all or s.runnable or s.availability == "unknown"]
        entries += registry_entries((status.model_spec for status in playable), listing.address)
        _left_out(listing.address, [s for s in listing.models if s not in playable])
    merged = merge(existing, entries, addresses)
    _write(directory / BACKEND_FILE, backend_source())
    _write(directory / REGISTRY_FILE, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    kept = len(merged) - len(entries)
    print(f"wrote {directory / BACKEND_FILE}")
    print(
        f"wrote {directory / REGISTRY_FILE}: {len(entries)} models of {', '.join(addresses)}, {kept} other entries kept"
    )
    for name in shadowed(existing, entries):
        print(f"note: {name}: an entry of another backend comes first in {REGISTRY_FILE} and wins", file=sys.stderr)
    for name, servers in served_twice(merged).items():
        print(
            f"note: {name} is on {len(servers)} servers ({', '.join(servers)}): games play it on {servers[0]}, "
            f"whose entry comes first in {REGISTRY_FILE}",
            file=sys.stderr,
        )
    if any(not isinstance(entry, dict) or "backend" not in entry for entry in merged):
        print(
            f"warning: {REGISTRY_FILE} has an entry without a backend: clemcore ignores the whole file then",
            file=sys.stderr,
        )
    return EXIT_OK


def _left_out(address: str, skipped: Sequence[Any]) -> None:
    if skipped:
        reasons = ", ".join(f"{s.name} ({s.availability_detail or s.availability})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(
            f"{address}: left out {len(skipped)} models the server cannot run now: {reasons}{more}; "
            "see `clemserve models`, or add them anyway with --all",
            file=sys.stderr,
        )


def registry_entries(specs: Iterable[Mapping[str, Any]], address: str) -> list[dict[str, Any]]:
    """One clemcore entry per server model name (the first, as the server resolves names), in server order."""
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for spec in specs:
        name = str(spec["model_name"])
        if name in seen:
            continue
        seen.add(name)
        rest = {key: value for key, value in spec.items() if key not in SERVER_ONLY and key != "model_name"}
        config = {"clemserve_address": address, "clemserve_backend": spec.get("backend", "")}
        entries.append({"model_name": name, "backend": BACKEND, **rest, "model_config": config})
    return entries


def merge(existing: Sequence[Any], entries: Sequence[dict[str, Any]], addresses: Iterable[str]) -> list[Any]:
    """Every entry of another backend, in its place, then the clemserve entries: those of other servers kept,
    those of ``addresses`` replaced by ``entries`` where the first of them stood (so that which of two servers
    wins a shared name stays as it was), the entries of a server new here last."""
    replaced = set(addresses)
    fresh: dict[str, list[dict[str, Any]]] = {address: [] for address in replaced}
    for entry in entries:
        fresh.setdefault(_address(entry), []).append(entry)
    servers: list[Any] = []
    for entry in existing:
        if not _is_clemserve(entry):
            continue
        address = _address(entry)
        if address not in replaced:
            servers.append(entry)
        elif address in fresh:
            servers += fresh.pop(address)
    for address in dict.fromkeys(map(_address, entries)):
        servers += fresh.pop(address, [])
    return [entry for entry in existing if not _is_clemserve(entry)] + servers


def served_twice(merged: Sequence[Any]) -> dict[str, list[str]]:
    """Model names that clemserve entries of more than one server hold, with those servers, first entry first."""
    servers: dict[str, list[str]] = {}
    for entry in merged:
        if _is_clemserve(entry):
            found = servers.setdefault(str(entry.get("model_name")), [])
            if _address(entry) not in found:
                found.append(_address(entry))
    return {name: found for name, found in servers.items() if len(found) > 1}


def _address(entry: dict[str, Any]) -> str:
    config = entry.get("model_config")
    return str(config.get("clemserve_address", "")) if isinstance(config, dict) else ""


def shadowed(existing: Sequence[Any], entries: Sequence[dict[str, Any]]) -> list[str]:
    """Server model names that a kept entry, coming first, takes from clemcore's lookup."""
    kept = {entry.get("model_name") for entry in existing if isinstance(entry, dict) and not _is_clemserve(entry)}
    return [entry["model_name"] for entry in entries if entry["model_name"] in kept]


def _is_clemserve(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("backend") == BACKEND


def read_registry(directory: Path) -> list[Any]:
    """The entries of ``directory/model_registry.json``; none when it does not exist yet."""
    if not directory.is_dir():
        raise SetupError(f"{directory}: no such directory")
    path = directory / REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SetupError(f"{path}: cannot read it ({exc}); fix or move it, it was left as it is") from None
    if isinstance(data, dict):  # clemcore also takes a single entry
        return [data]
    if not isinstance(data, list):
        raise SetupError(f"{path}: holds a {type(data).__name__}, not a list of entries; it was left as it is")
    return data


def backend_source() -> str:
    source = resources.files("clemserve.client").joinpath("clemcore_backend.py").read_text(encoding="utf-8")
    header = "# Written by `clemserve clemcore-setup` from clemserve.client.clemcore_backend; run it again to update.\n"
    return header + source


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole: a game starting meanwhile reads the old file or the new one, never half."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
