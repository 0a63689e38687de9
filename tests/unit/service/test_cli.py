"""``clemserve serve``'s start refusing bad input of the spend, rate-limit and record flags and files: each goes
through ``main()`` (the flags' parser, then the files read by ``build_manager``) and stops the start with exit
status 2 and a message naming the flag or file and the field, never a silent zero."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from clemserve.service import cli, server
from clemserve.service.model_cache import ModelCache
from clemserve.service.spend import SPEND_FILE, SpendLedger

#: (the flags, given the test's folder; what the message must say, given the folder)
Case = tuple[Callable[[Path], list[str]], Callable[[Path], list[str]]]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _prices(d: Path, price: object) -> list[str]:
    return ["--prices", str(_write(d / "prices.json", json.dumps({"m": price})))]


def _registry(d: Path) -> list[str]:
    entry = {
        "model_name": "g",
        "backend": "openai",
        "model_id": "gpt-4o",
        "model_config": {"price": {"input_per_mtok": 1}},
    }
    return ["--registry", str(_write(d / "registry.json", json.dumps([entry])))]


def _spend_file(d: Path, row: tuple[object, ...] | None) -> list[str]:
    cache = d / "cache"
    if row is None:
        _write(cache / SPEND_FILE, "not a database " * 100)
    else:
        SpendLedger([], cache / SPEND_FILE).close()
        with sqlite3.connect(cache / SPEND_FILE) as db:
            db.execute("INSERT INTO spend VALUES (?, ?, ?, ?)", row)
    return ["--spend-limit", "openai=5/day", "--cache-dir", str(cache)]


def _record(d: Path) -> list[str]:
    line = json.dumps({"version": 1, "hash": "h", "request": {}, "triple": ["p", {}, "t"], "usage": {"n": "x"}})
    return ["--replay", str(_write(d / "record.jsonl", line + "\n"))]


CASES: dict[str, Case] = {
    "--prices, an unknown field": (
        lambda d: _prices(d, {"input_per_mtok": 1, "output_per_mok": 2}),
        lambda d: [f"price file {d / 'prices.json'}", "m.output_per_mok: unknown price field"],
    ),
    "--prices, a negative price": (
        lambda d: _prices(d, {"input_per_mtok": -1, "output_per_mtok": 2}),
        lambda d: [f"price file {d / 'prices.json'}", "m.input_per_mtok: must be a number"],
    ),
    "--prices, not JSON": (
        lambda d: ["--prices", str(_write(d / "prices.json", "{"))],
        lambda d: [f"price file {d / 'prices.json'}", "not JSON"],
    ),
    "--prices, no such file": (
        lambda d: ["--prices", str(d / "none.json")],
        lambda d: [f"price file {d / 'none.json'}", "cannot read it"],
    ),
    "a registry entry's price": (
        _registry,
        lambda d: [f"registry {d / 'registry.json'}", "'g'", "model_config.price.output_per_mtok: missing"],
    ),
    "--spend-limit, a period": (
        lambda d: ["--spend-limit", "openai=5/week"],
        lambda d: ["--spend-limit", "openai: the period must be one of hour, day, month"],
    ),
    "--spend-limit, an amount": (
        lambda d: ["--spend-limit", "openai=0/day"],
        lambda d: ["--spend-limit", "openai: the amount must be a number of US dollars above 0"],
    ),
    "--spend-limit, a name": (
        lambda d: ["--spend-limit", "opneai=5/day"],
        lambda d: ["--spend-limit", "unknown name 'opneai'"],
    ),
    "the spend file, not SQLite": (
        lambda d: _spend_file(d, None),
        lambda d: [f"spend file {d / 'cache' / SPEND_FILE}", "not a clemserve spend file"],
    ),
    "the spend file, a row": (
        lambda d: _spend_file(d, ("openai", "day", "2026-12-01T00:00:00+00:00", "lots")),
        lambda d: [f"spend file {d / 'cache' / SPEND_FILE}", "row 1: usd must be a number"],
    ),
    "the spend file, a cache directory that is a file": (
        lambda d: ["--spend-limit", "openai=5/day", "--cache-dir", str(_write(d / "cache", ""))],
        lambda d: [f"spend file {d / 'cache' / SPEND_FILE}", "cannot open it"],
    ),
    "--rate-limit, a number": (
        lambda d: ["--rate-limit", "openai=rpm:x"],
        lambda d: ["--rate-limit", "openai: rpm must be a whole number above 0, got 'x'"],
    ),
    "--rate-limit, a field": (
        lambda d: ["--rate-limit", "openai=burst:5"],
        lambda d: ["--rate-limit", "openai: unknown field 'burst'"],
    ),
    "--replay, a corrupt record": (_record, lambda d: [f"{d / 'record.jsonl'}:1", "field usage"]),
    "--replay, no such file": (
        lambda d: ["--replay", str(d / "none.jsonl")],
        lambda d: [f"--replay {d / 'none.jsonl'}", "cannot read it"],
    ),
    "--replay-miss": (lambda d: ["--replay-miss", "skip"], lambda d: ["--replay-miss", "'skip'"]),
    "--record, no such folder": (
        lambda d: ["--record", str(d / "none" / "record.jsonl")],
        lambda d: [f"--record {d / 'none' / 'record.jsonl'}", "cannot append to it"],
    ),
}


def _start(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """``clemserve serve`` with ``argv`` up to the point where it would serve: its exit status, and the
    servers it got as far as starting (a stand-in that returns at once)."""
    served: list[str] = []

    async def serve(config: object, manager: ModelCache) -> int:
        served.append(type(manager).__name__)
        await manager.shutdown()
        return 0

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # main() sets the hub's switch for the process
        monkeypatch.delenv(name, raising=False)
    key_file = _write(tmp_path / "key.json", "{}")
    base = ["serve", "--key-file", str(key_file), "--cache-dir", str(tmp_path / "default-cache")]
    try:
        return cli.main([*base, *argv]), served
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 2, served


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_stops_the_start_naming_the_flag_or_file_and_the_field(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, says = CASES[case]
    status, served = _start(flags(tmp_path), tmp_path, monkeypatch)
    message = capsys.readouterr().err
    assert (status, served) == (2, [])
    assert message.startswith("clemserve: ")
    for part in says(tmp_path):
        assert part in message


def test_the_same_flags_on_good_files_start_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals above are each for its own bad input: well-formed values of the same flags start."""
    good = [
        *_prices(tmp_path, {"input_per_mtok": 1, "output_per_mtok": 2, "cache_write_per_mtok": 1.25}),
        *["--spend-limit", "openai=5/day", "--rate-limit", "openai=rpm:60"],
        *["--record", str(tmp_path / "record.jsonl"), "--replay-miss", "forward"],
    ]
    assert _start(good, tmp_path, monkeypatch) == (0, ["RecordingModelCache"])
    assert (tmp_path / "default-cache" / SPEND_FILE).exists()
