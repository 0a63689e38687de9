"""``clemserve run --replay``'s server, without starting it: its registry from the record, its errors, its
summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clemserve.client.replay import ReplayError, ReplayServer, record_entries

ENTRY = {"model_name": "m", "backend": "openai", "model_id": "gpt-x"}


def _line(model: dict[str, object]) -> str:
    return json.dumps({"version": 1, "hash": "h", "request": {"model": model}, "triple": [], "usage": {}}) + "\n"


def test_the_registry_holds_each_recorded_model_once(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    other = {"model_name": "n", "backend": "fault"}
    record.write_text(_line(ENTRY) + "not json\n" + _line(other) + _line(ENTRY))
    assert record_entries(record) == [ENTRY, other]  # a broken line is the server's to name


def test_one_name_with_two_entries_is_refused(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    record.write_text(_line(ENTRY) + _line({**ENTRY, "model_id": "gpt-y"}))
    with pytest.raises(ReplayError, match="'m' is recorded with two registry entries"):
        record_entries(record)


def test_a_missing_record_is_named(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"--replay .*absent\.jsonl: no such file"):
        ReplayServer(tmp_path / "absent.jsonl", "refuse").start()


def test_the_summary_is_the_servers_replay_line(tmp_path: Path) -> None:
    server = ReplayServer(tmp_path / "calls.jsonl", "refuse")
    server.log_path.write_text("INFO clemserve.service.record replay of /r.jsonl: 3 calls answered, 0 misses\nend\n")
    assert server.stop() == "replay of /r.jsonl: 3 calls answered, 0 misses"
    assert not server.folder.exists()  # its registry and log are gone with it


def test_a_server_that_logged_no_summary_has_none(tmp_path: Path) -> None:
    server = ReplayServer(tmp_path / "calls.jsonl", "refuse")
    server.log_path.write_text("clemserve: calls.jsonl:1: not a record line\n")
    assert server.stop() == ""
