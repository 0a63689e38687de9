"""Record and replay: every call the server answers written to an append-only file, and calls answered from
such a file instead of a model.

A call's *canonical request* is what decides its answer: the resolved registry entry's engine fields (its name,
backend and model id, ...), the messages exactly (an image as its bytes' SHA-256 and type), and the
generation arguments. Its SHA-256 over canonical JSON (sorted keys) keys the record. The record is JSON
Lines, one object per call: ``version``, ``hash``, ``request``, the ``triple`` (prompt, response object,
response text, as the backend returned them: ``clem_player`` is stamped on each reply again), ``usage``,
``finish_reason``, ``time`` and ``seconds``. Every call is recorded, local models' too. The file holds prompts,
never keys, and is created 0600.

Replay loads a record at start (a line that is not a record fails the start, naming the file and line) and
answers each request whose canonical form it holds with the recorded answers to it, identical requests in
their recorded order, without loading the model. A miss (a request not recorded, or recorded fewer times) is
forwarded to the model or refused with ``REPLAY_MISS``, as ``--replay-miss`` says; misses are counted (the
``clemserve_replayed_calls`` metric), logged, and summed up at shutdown.

The hook is :class:`RecordingModelCache`, the model cache that the server builds when either file is given:
its ``generate`` is the one path of every call (streams and batches included), and the model cache itself
knows nothing of records.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter, deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import FailedPreconditionError

from .domain import FinishReason, GenArgs, Generation, ImagePart, Message
from .metrics import MetricsSink
from .model_cache import ModelCache
from .resolver import ENGINE_FIELDS, Selector
from .streaming import StreamObserver
from .validation import validate_messages

log = logging.getLogger(__name__)

VERSION = 1
MISS_POLICIES = ("refuse", "forward")
#: how often appended lines are synced to disk (and at close)
SYNC_EVERY_S = 1.0
#: the fields every record line has
_FIELDS = ("version", "hash", "request", "triple", "usage")


class ReplayMissError(FailedPreconditionError):
    """A request the replayed record does not answer, under ``--replay-miss refuse``."""

    reason = "REPLAY_MISS"

    def __init__(self, model: str, request_hash: str, record: Path) -> None:
        super().__init__(
            f"{model!r}: this request is not in the replayed record {record.name} (or was answered there fewer "
            f"times than asked; request hash {request_hash[:16]}), and --replay-miss refuse does not forward it",
            subject=f"--replay {record.name}",
        )
        self.metadata.update(model=model, request_hash=request_hash)


def _image(part: ImagePart) -> dict[str, str]:
    return {"sha256": hashlib.sha256(part.data).hexdigest(), "mime_type": part.mime_type}


def _message(message: Message) -> dict[str, Any]:
    canonical = dict(message)
    if "image" in canonical:
        canonical["image"] = [_image(part) for part in canonical["image"]]
    return canonical


def canonical_request(spec: ModelSpec, messages: Sequence[Message], args: GenArgs) -> dict[str, Any]:
    """What decides a call's answer: the entry's engine fields, the messages, the generation arguments."""
    entry = spec.to_dict()
    return {
        "model": {name: entry[name] for name in ENGINE_FIELDS if name in entry},
        "messages": [_message(message) for message in messages],
        "args": {**args.extra, "temperature": args.temperature, "max_tokens": args.max_tokens},
    }


def request_hash(request: dict[str, Any]) -> str:
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_line(request: dict[str, Any], digest: str, generation: Generation) -> str:
    """One call as a line of the record."""
    entry = {
        "version": VERSION,
        "hash": digest,
        "request": request,
        "triple": [generation.prompt, generation.response, generation.text],
        "usage": {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "cached_prompt_tokens": generation.cached_prompt_tokens,
            "reasoning_tokens": generation.reasoning_tokens,
        },
        "finish_reason": generation.finish_reason.name,
        "time": (generation.call_start or datetime.now()).isoformat(),
        "seconds": generation.call_duration.total_seconds() if generation.call_duration else 0.0,
    }
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


class RecordWriter:
    """Appends lines to a record file created 0600; every line in one ``write`` (O_APPEND), synced to disk
    at most every ``SYNC_EVERY_S`` and at close. Called on the event loop only: that is its one writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)  # an existing file too: it holds prompts
        self._sync: asyncio.TimerHandle | None = None
        self.lines = 0

    def append(self, line: str) -> None:
        os.write(self._fd, line.encode("utf-8"))
        self.lines += 1
        if self._sync is None:
            self._sync = asyncio.get_running_loop().call_later(SYNC_EVERY_S, self._synced)

    def _synced(self) -> None:
        self._sync = None
        os.fsync(self._fd)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            self._sync = None
        os.fsync(self._fd)
        os.close(self._fd)


@dataclasses.dataclass
class _Answer:
    triple: list[Any]
    usage: dict[str, int]
    finish_reason: str


class ReplayStore:
    """A record's answers by request hash, each hash's answers in their recorded order."""

    def __init__(self, path: Path, answers: dict[str, deque[_Answer]]) -> None:
        self.path = path
        self._answers = answers
        self.hits = 0
        #: (model name, request hash) of each request not answered, with how often
        self.misses: Counter[tuple[str, str]] = Counter()

    @classmethod
    def load(cls, path: Path) -> ReplayStore:
        """Read a record; a line that is not one fails with ValueError naming the file and the line."""
        answers: dict[str, deque[_Answer]] = {}
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                digest, answer = _parse(line, f"{path}:{number}")
                answers.setdefault(digest, deque()).append(answer)
        return cls(path, answers)

    def __len__(self) -> int:
        return sum(len(answers) for answers in self._answers.values())

    def answer(self, digest: str, model: str) -> Generation | None:
        """The next recorded answer to this request (None: a miss, counted)."""
        answers = self._answers.get(digest)
        if not answers:
            self.misses[(model, digest)] += 1
            log.info("replay miss: %s, request hash %s", model, digest[:16])
            return None
        self.hits += 1
        answer = answers.popleft()
        prompt, response, text = copy.deepcopy(answer.triple)
        usage = answer.usage
        return Generation(
            prompt,
            response,
            text,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            cached_prompt_tokens=usage.get("cached_prompt_tokens", 0),
            reasoning_tokens=usage.get("reasoning_tokens", 0),
            finish_reason=FinishReason[answer.finish_reason],
            call_start=datetime.now(),
            call_duration=timedelta(0),
        )

    def summary(self, miss_policy: str) -> str:
        line = f"replay of {self.path}: {self.hits} calls answered from the record, {sum(self.misses.values())} misses"
        if not self.misses:
            return line
        listed = "; ".join(f"{model} {digest[:16]} x{count}" for (model, digest), count in self.misses.items())
        verb = "forwarded" if miss_policy == "forward" else "refused"
        return f"{line} ({verb}): {listed}"


def _parse(line: str, where: str) -> tuple[str, _Answer]:
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: not a record line (not JSON: {exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not a record line (a JSON object expected)")
    missing = [name for name in _FIELDS if name not in entry]
    if missing:
        raise ValueError(f"{where}: not a record line (no field {', '.join(missing)})")
    if entry["version"] != VERSION:
        raise ValueError(f"{where}: field version is {entry['version']!r}; this server reads version {VERSION}")
    triple, usage = entry["triple"], entry["usage"]
    if not (isinstance(triple, list) and len(triple) == 3 and isinstance(triple[2], str)):
        raise ValueError(f"{where}: field triple must be [prompt, response object, response text]")
    if not isinstance(usage, dict) or not all(isinstance(v, int) for v in usage.values()):
        raise ValueError(f"{where}: field usage must map token counts to integers")
    finish = entry.get("finish_reason", FinishReason.UNSPECIFIED.name)
    if finish not in FinishReason.__members__:
        raise ValueError(
            f"{where}: field finish_reason is {finish!r}, not one of {', '.join(FinishReason.__members__)}"
        )
    digest = entry["hash"]
    if not isinstance(digest, str) or digest != request_hash(entry["request"]):
        raise ValueError(f"{where}: field hash does not match its request (edited by hand?)")
    return digest, _Answer(triple, usage, finish)


@dataclasses.dataclass(frozen=True)
class RecordSettings:
    """``--record FILE``, ``--replay FILE``, ``--replay-miss forward|refuse`` (service/config.py)."""

    record: Path | None = None
    replay: Path | None = None
    replay_miss: str = "refuse"


class Recording:
    """What ``RecordingModelCache`` asks of each call: its canonical request, the recorded answer to it, the
    record of it."""

    def __init__(self, writer: RecordWriter | None = None, store: ReplayStore | None = None, miss: str = "refuse"):
        self.writer, self.store, self.miss = writer, store, miss

    @classmethod
    def open(cls, settings: RecordSettings) -> Recording:
        """The files of ``settings`` opened (the record) and read (the replay); ValueError naming the flag and
        file, or the file, line and field."""
        try:
            store = ReplayStore.load(settings.replay) if settings.replay is not None else None
        except OSError as exc:
            raise ValueError(f"--replay {settings.replay}: cannot read it: {exc.strerror or exc}") from None
        try:
            writer = RecordWriter(settings.record) if settings.record is not None else None
        except OSError as exc:
            raise ValueError(f"--record {settings.record}: cannot append to it: {exc.strerror or exc}") from None
        if store is not None:
            log.info(
                "replaying %d recorded calls from %s (misses: %s)", len(store), settings.replay, settings.replay_miss
            )
        if writer is not None:
            log.info("recording every call to %s", settings.record)
        return cls(writer, store, settings.replay_miss)

    def request(self, spec: ModelSpec, messages: Sequence[Message], args: GenArgs) -> tuple[dict[str, Any], str]:
        """The call's canonical request and its hash."""
        request = canonical_request(spec, messages, args)
        return request, request_hash(request)

    def replayed(self, canonical: tuple[dict[str, Any], str], model: str, metrics: MetricsSink) -> Generation | None:
        """The recorded answer to the call; None: call the model. A miss under ``refuse`` raises."""
        if self.store is None:
            return None
        generation = self.store.answer(canonical[1], model)
        metrics.replayed(model, generation is not None)
        if generation is None and self.miss == "refuse":
            raise ReplayMissError(model, canonical[1], self.store.path)
        return generation

    def record(self, canonical: tuple[dict[str, Any], str], generation: Generation) -> None:
        if self.writer is not None:
            self.writer.append(record_line(*canonical, generation))

    def close(self) -> None:
        if self.store is not None:
            log.info("%s", self.store.summary(self.miss))
        if self.writer is not None:
            self.writer.close()
            log.info("recorded %d calls to %s", self.writer.lines, self.writer.path)


class RecordingModelCache(ModelCache):
    """The model cache with ``--record`` or ``--replay``: its one generation path (streams and batches go
    through ``generate`` too) first asks the record, then records what the model answered."""

    def __init__(self, *args: Any, recording: Recording, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recording = recording

    async def generate(
        self,
        selector: Selector,
        messages: Sequence[Message],
        args: GenArgs,
        caller: str = "",
        observer: StreamObserver | None = None,
    ) -> tuple[ModelSpec, Generation]:
        spec = self.resolver.servable(selector)[0]
        validate_messages(messages)
        canonical = self.recording.request(spec, messages, args)
        replayed = self.recording.replayed(canonical, spec["model_name"], self.metrics)
        if replayed is not None:  # answered from the record: the model is neither loaded nor called, nor paid
            if observer is not None:
                observer.text(replayed.text)
            return spec, replayed
        spec, generation = await super().generate(selector, messages, args, caller, observer)
        self.recording.record(canonical, generation)
        return spec, generation

    async def shutdown(self) -> None:
        await super().shutdown()
        self.recording.close()
