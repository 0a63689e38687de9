"""Record and replay without a server: the canonical request, the record file, the replayed answers."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.backends.fault import FaultBackend
from clemserve.service.config import parse_server_config
from clemserve.service.domain import FinishReason, GenArgs, Generation, ImagePart
from clemserve.service.metrics import Metrics, NoMetrics
from clemserve.service.record import (
    Recording,
    RecordingModelCache,
    RecordSettings,
    RecordWriter,
    ReplayMissError,
    ReplayStore,
    canonical_request,
    record_line,
    request_hash,
)
from clemserve.service.scheduler import SchedulingPolicy

SPEC = ModelSpec.from_dict({"model_name": "m", "backend": "openai", "model_id": "gpt-x", "temperature": 0.5})
HI = [{"role": "user", "content": "hi"}]


def _hash(spec: ModelSpec = SPEC, messages: list[dict[str, object]] = HI, args: GenArgs | None = None) -> str:
    return request_hash(canonical_request(spec, messages, args or GenArgs()))


def test_the_canonical_request_keys_on_entry_messages_and_arguments_only() -> None:
    same = _hash(ModelSpec.from_dict({"temperature": 0.5, "backend": "openai", "model_id": "gpt-x", "model_name": "m"}))
    assert same == _hash()  # key order and fields that do not change the engine are not part of it
    other_id = ModelSpec.from_dict({"model_name": "m", "backend": "openai", "model_id": "gpt-y"})
    assert len({_hash(), _hash(other_id), _hash(messages=[{"role": "user", "content": "hi!"}])}) == 3
    assert _hash(args=GenArgs(max_tokens=10)) != _hash() != _hash(args=GenArgs(extra={"top_p": 0.9}))


def test_an_image_counts_by_its_bytes_and_type_not_its_source() -> None:
    def with_image(data: bytes, source: str) -> str:
        return _hash(messages=[{"role": "user", "content": "see", "image": [ImagePart(data, "image/png", source)]}])

    assert with_image(b"png", "a.png") == with_image(b"png", "b.png") != with_image(b"gif", "a.png")


def _generation(text: str) -> Generation:
    return Generation(
        ["prompt"], {"id": text}, text, prompt_tokens=3, completion_tokens=1, finish_reason=FinishReason.STOP
    )


def _record(path: Path, *answers: tuple[str, str]) -> None:
    """One line per (message, answer)."""
    with open(path, "a") as file:
        for message, text in answers:
            request = canonical_request(SPEC, [{"role": "user", "content": message}], GenArgs())
            file.write(record_line(request, request_hash(request), _generation(text)))


def test_identical_requests_get_their_recorded_answers_in_order_then_miss(tmp_path: Path) -> None:
    path = tmp_path / "record.jsonl"
    _record(path, ("hi", "first"), ("other", "x"), ("hi", "second"))
    store = ReplayStore.load(path)
    assert len(store) == 3
    answers = [store.answer(_hash(), "m") for _ in range(3)]
    assert [a.text if a else None for a in answers] == ["first", "second", None]
    first = answers[0]
    assert first is not None and first.response == {"id": "first"} and first.finish_reason is FinishReason.STOP
    assert (first.prompt, first.prompt_tokens, first.completion_tokens) == (["prompt"], 3, 1)
    assert store.hits == 2 and store.misses == {("m", _hash()): 1}
    assert "2 calls answered from the record, 1 misses (refused): m" in store.summary("refuse")


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON object expected"),
        ('{"version": 1, "hash": "h", "request": {}}', "no field triple, usage"),
        ('{"version": 9, "hash": "h", "request": {}, "triple": [1, 2, "t"], "usage": {}}', "field version is 9"),
        ('{"version": 1, "hash": "h", "request": {}, "triple": [1, 2], "usage": {}}', "field triple"),
        ('{"version": 1, "hash": "h", "request": {}, "triple": [1, 2, "t"], "usage": {"a": "x"}}', "field usage"),
        ('{"version": 1, "hash": "h", "request": {}, "triple": [1, 2, "t"], "usage": {}}', "field hash"),
    ],
)
def test_a_corrupt_record_fails_naming_the_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "record.jsonl"
    _record(path, ("hi", "fine"))
    with open(path, "a") as file:
        file.write("\n" + line + "\n")  # an empty line is skipped, and counted
    with pytest.raises(ValueError, match=rf"^{path}:3: .*{says}"):
        ReplayStore.load(path)


def test_the_record_file_is_created_0600_and_an_existing_one_becomes_0600(tmp_path: Path) -> None:
    async def write(path: Path) -> None:
        writer = RecordWriter(path)
        request = canonical_request(SPEC, HI, GenArgs())
        writer.append(record_line(request, request_hash(request), _generation("a")))
        writer.close()

    fresh, existing = tmp_path / "fresh.jsonl", tmp_path / "existing.jsonl"
    existing.write_text("")
    existing.chmod(0o644)
    for path in (fresh, existing):
        asyncio.run(write(path))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["triple"] == [["prompt"], {"id": "a"}, "a"]
    asyncio.run(write(existing))
    assert len(existing.read_text().splitlines()) == 2  # appended


def test_refuse_raises_a_replay_miss_naming_the_model(tmp_path: Path) -> None:
    path = tmp_path / "record.jsonl"
    _record(path, ("hi", "a"))
    recording = Recording.open(RecordSettings(replay=path, replay_miss="refuse"))
    canonical = recording.request(SPEC, [{"role": "user", "content": "changed"}], GenArgs())
    with pytest.raises(ReplayMissError) as refused:
        recording.replayed(canonical, "m", NoMetrics())
    error = refused.value
    assert (error.code, error.reason, error.metadata["model"]) == ("FAILED_PRECONDITION", "REPLAY_MISS", "m")
    assert "'m'" in error.message and "record.jsonl" in error.message


def test_the_flags_parse_and_bad_values_stop_the_start(tmp_path: Path) -> None:
    config = parse_server_config(["--record", "a.jsonl", "--replay", "b.jsonl", "--replay-miss", "REFUSE"], {})
    assert config.recording == RecordSettings(Path("a.jsonl"), Path("b.jsonl"), "refuse")
    assert parse_server_config([], {"CLEMSERVE_REPLAY": "b.jsonl"}).recording.replay == Path("b.jsonl")
    with pytest.raises(SystemExit, match="--replay-miss must be refuse or forward, got 'skip'"):
        parse_server_config(["--replay-miss", "skip"], {})
    with pytest.raises(SystemExit, match="name the same file"):
        parse_server_config(["--record", "a.jsonl", "--replay", "./a.jsonl"], {})


def _cache(tmp_path: Path, name: str, recording: Recording, metrics: Metrics) -> RecordingModelCache:
    entry = ModelSpec.from_dict({"model_name": name, "backend": "fault"})
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    policy = SchedulingPolicy(max_wait_s=0)
    return RecordingModelCache(ModelRegistry([entry]), context, policy=policy, metrics=metrics, recording=recording)


def test_the_model_cache_records_calls_and_replays_them_without_loading_the_model(tmp_path: Path) -> None:
    path, name = tmp_path / "record.jsonl", "replayed-fault"
    conversations = [[{"role": "user", "content": f"say {word}"}] for word in ("one", "two", "one")]

    metrics = Metrics(process=False)

    async def run(recording: Recording) -> list[Generation]:
        cache = _cache(tmp_path, name, recording, metrics)
        try:
            return [(await cache.generate(name, messages, GenArgs()))[1] for messages in conversations]
        finally:
            await cache.shutdown()

    recorded = asyncio.run(run(Recording.open(RecordSettings(record=path))))
    loads = FaultBackend._loads[name]
    assert len(path.read_text().splitlines()) == 3
    replayed = asyncio.run(run(Recording.open(RecordSettings(replay=path, replay_miss="refuse"))))
    assert FaultBackend._loads[name] == loads  # not loaded again: every answer came from the record
    assert [(g.prompt, g.response, g.text) for g in replayed] == [(g.prompt, g.response, g.text) for g in recorded]
    assert all(g.call_start is not None for g in replayed)  # clem_player is stamped on replies again
    counted = {"model": name, "result": "answered"}
    assert metrics.registry.get_sample_value("clemserve_replayed_calls_total", counted) == 3
