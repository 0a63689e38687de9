"""Record and replay (service/record.py) through real servers: a server that records calls on a remote model
(the stand-in provider), and servers that replay that record with no key and no provider call."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from clemserve.client import FailedPreconditionError
from tests.providers import assert_no_key_leaks, openai_reply
from tests.serving import ServerPool, ServerProcess
from tests.standin import Recorded, Reply, StandIn

from .conftest import RETRY_FLAGS, all_keys

CHAT = r"^/chat/completions$"
NAME = "replay-gpt"
ENTRIES: list[dict[str, Any]] = [{"model_name": NAME, "backend": "openai", "model_id": "gpt-4o-mini"}]
#: one call twice with different answers (replayed in their order), and a batch
CALLS = [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "Say hello."}]]
BATCH = [[{"role": "user", "content": f"Name a colour ({i})."}] for i in range(3)]


def _numbered() -> Any:
    count = iter(range(1000))

    def respond(request: Recorded) -> Reply:
        return Reply(200, openai_reply(f"answer {next(count)} to {request.json['messages'][-1]['content']}"))

    return respond


def _model(server: ServerProcess) -> backends.Model:
    model = backends.get_model_for(NAME, address=server.address, lease=False)
    model.set_gen_args(temperature=0.0, max_tokens=50)
    return model


def _play(server: ServerProcess) -> list[Any]:
    model = _model(server)
    return [model.generate_response(messages) for messages in CALLS] + model.generate_batch_response(BATCH)


def _untimed(triple: Any) -> Any:
    prompt, response, text = triple
    player = dict(response["clem_player"])
    assert player.pop("call_start") and player.pop("call_duration")
    return prompt, {**response, "clem_player": player}, text


@pytest.fixture(scope="module")
def recorded(
    server_pool: ServerPool, remote_registry: Path, standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Any]]:
    """The record of a played set of calls, and their triples."""
    folder = tmp_path_factory.mktemp("record")
    record, keys = folder / "calls.jsonl", folder / "key.json"
    keys.write_text(json.dumps(all_keys(standin.url)))
    standin.script("POST", CHAT, _numbered())
    server = server_pool(remote_registry, "--key-file", str(keys), *RETRY_FLAGS, "--record", str(record))
    triples = _play(server)
    assert len(list(standin.matching(CHAT))) == 5
    return record, triples


def test_a_replay_answers_with_the_recorded_triples_without_key_or_provider_call(
    recorded: tuple[Path, list[Any]], server_pool: ServerPool, remote_registry: Path, standin: StandIn
) -> None:
    record, triples = recorded
    assert triples[0][2] != triples[1][2]  # the same request, answered twice differently
    replay = server_pool(remote_registry, "--replay", str(record), "--replay-miss", "refuse")  # no key file
    replayed = _play(replay)
    assert [_untimed(t) for t in replayed] == [_untimed(t) for t in triples]
    assert list(standin.matching(CHAT)) == []  # no upstream call
    with pytest.raises(FailedPreconditionError) as refused:  # all three answers to it used up
        _model(replay).generate_response(CALLS[0])
    assert refused.value.reason == "REPLAY_MISS" and refused.value.metadata["model"] == NAME
    assert NAME in str(refused.value)


def test_a_changed_request_is_refused_or_forwarded_as_asked(
    recorded: tuple[Path, list[Any]], server_pool: ServerPool, remote_registry: Path, standin: StandIn
) -> None:
    record, _ = recorded
    refusing = server_pool(remote_registry, "--replay", str(record), "--replay-miss", "refuse")
    changed = [{"role": "user", "content": "Say hello, please."}]
    with pytest.raises(FailedPreconditionError, match=r"not in the replayed record calls\.jsonl"):
        _model(refusing).generate_response(changed)
    keys = record.parent / "key.json"
    forwarding = server_pool(
        remote_registry, "--key-file", str(keys), *RETRY_FLAGS, "--replay", str(record), "--replay-miss", "forward"
    )
    standin.script("POST", CHAT, lambda request: Reply(200, openai_reply("forwarded")))
    assert _model(forwarding).generate_response(changed)[2] == "forwarded"
    assert _model(forwarding).generate_response(CALLS[0])[2].startswith("answer 0")  # a hit is still replayed
    assert len(list(standin.matching(CHAT))) == 1


def test_the_record_is_0600_holds_the_calls_and_no_key(recorded: tuple[Path, list[Any]]) -> None:
    record, triples = recorded
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(lines) == 5 and {line["request"]["model"]["model_id"] for line in lines} == {"gpt-4o-mini"}
    assert lines[0]["request"]["messages"] == CALLS[0] and lines[0]["usage"]["prompt_tokens"] == 3
    assert sorted(line["triple"][2] for line in lines) == sorted(t[2] for t in triples)
    assert_no_key_leaks(record.read_text())


def test_a_corrupt_record_stops_the_start_naming_file_and_line(tmp_path: Path, remote_registry: Path) -> None:
    record = tmp_path / "calls.jsonl"
    record.write_text('{"version": 1}\n')
    started = subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--port", "0", "--replay", str(record)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert started.returncode == 2
    assert f"{record}:1: not a record line (no field hash, request, triple, usage)" in started.stderr
