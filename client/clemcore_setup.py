"""``clemserve clemcore-setup``: a clemcore working directory whose models are a clemserve server's.

clemcore finds backends as ``<name>_api.py`` files and models in ``model_registry.json``, both in its working
directory. This writes ``clemserve_api.py`` (a copy of ``clemserve.client.clemcore_backend``) and merges one
entry per server model into ``model_registry.json``. Like the other operator commands (``commands``) it is a
client and needs the client's dependencies only: it runs on the game machine.
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
            f"server's (so they win a name clash); only earlier {BACKEND} entries are replaced. The address is "
            f"recorded in each entry's model_config.clemserve_address; CLEMSERVE_ADDRESS overrides it when games "
            f"run. Only the models the server can run are added (as `clemserve models --available` lists them), "
            f"so that `clem list models` shows what can be played; --all adds every one. Run clem (clemcore's "
            f"CLI) in DIR afterwards."
        ),
    )
    parser.add_argument(
        "--all", action="store_true", help="add every server model, also those it cannot run now (no key, ...)"
    )
    add_connection_flags(parser, environ)
    parser.add_argument(
        "dir", nargs="?", default=".", metavar="DIR", help="the clemcore working directory (default: .)"
    )


def run(args: argparse.Namespace) -> int:
    import clemserve.client as backends

    directory = Path(args.dir)
    try:
        existing = read_registry(directory)
        statuses = backends.list_models(address=args.address, timeout=args.timeout)
    except SetupError as exc:
        print(f"clemserve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except backends.ClemserveError as exc:
        return report(exc)
    # a server too old to say (unknown) is taken at its word that its models run
    playable = [s for s in statuses if args.all or s.runnable or s.availability == "unknown"]
    entries = registry_entries((status.model_spec for status in playable), args.address)
    merged = merge(existing, entries)
    _write(directory / BACKEND_FILE, backend_source())
    _write(directory / REGISTRY_FILE, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    kept = len(merged) - len(entries)
    print(f"wrote {directory / BACKEND_FILE}")
    print(f"wrote {directory / REGISTRY_FILE}: {len(entries)} models of {args.address}, {kept} other entries kept")
    skipped = [s for s in statuses if s not in playable]
    if skipped:
        reasons = ", ".join(f"{s.name} ({s.availability_detail or s.availability})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(
            f"left out {len(skipped)} models the server cannot run now: {reasons}{more}; "
            "see `clemserve models`, or add them anyway with --all",
            file=sys.stderr,
        )
    for name in shadowed(existing, entries):
        print(f"note: {name}: an entry of another backend comes first in {REGISTRY_FILE} and wins", file=sys.stderr)
    if any(not isinstance(entry, dict) or "backend" not in entry for entry in merged):
        print(
            f"warning: {REGISTRY_FILE} has an entry without a backend: clemcore ignores the whole file then",
            file=sys.stderr,
        )
    return EXIT_OK


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


def merge(existing: Sequence[Any], entries: Sequence[dict[str, Any]]) -> list[Any]:
    """Every entry of another backend, in its place, then the server's; earlier clemserve entries go."""
    return [entry for entry in existing if not _is_clemserve(entry)] + list(entries)


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
