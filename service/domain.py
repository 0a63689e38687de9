"""Domain types between the servicer and the backends (no protobuf, no grpc)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from clemserve.registry import ModelSpec

#: A chat message as clembench passes it: {"role", "content", ["image": list[ImagePart]], ...extras}.
Message = dict[str, Any]

#: takes a piece of generated text; called on the event loop thread
TextSink = Callable[[str], None]

DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 300


@dataclass(frozen=True)
class ImagePart:
    """Image bytes a client read and sent; ``source`` is what the caller named (path, URL, 'data:')."""

    data: bytes
    mime_type: str
    source: str

    def __repr__(self) -> str:
        return f"ImagePart({self.mime_type or 'unknown'}, {len(self.data)} bytes, {self.source!r})"


@dataclass(frozen=True)
class GenArgs:
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    #: further arguments, e.g. {"top_p": 0.9}; each backend accepts the ones it can honour
    extra: dict[str, Any] = field(default_factory=dict)


class FinishReason(enum.Enum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2


@dataclass
class Generation:
    """One row's result: clembench's (prompt, response_object, response_text) plus usage."""

    prompt: Any
    response: dict[str, Any]
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    #: when the server's call on the model started and how long it took, queue included (clembench's
    #: ``clem_player`` block in the reply); None before the call is done
    call_start: datetime | None = None
    call_duration: timedelta | None = None


#: one request's result in a batch: its generation or its own error
Outcome = Generation | BaseException


@dataclass(frozen=True)
class TokenCount:
    prompt_tokens: int
    context_size: int
    prompt: str = ""


class ModelState(enum.Enum):
    NOT_LOADED = 1
    LOADING = 2
    READY = 3
    FAILED = 4


class Availability(enum.Enum):
    """Whether a model can run on this server, found without loading it (ListModels)."""

    READY = 1
    CAN_LOAD = 2
    NEEDS_KEY = 3
    NEEDS_WEIGHTS = 4
    NEEDS_EXTRA = 5
    NEEDS_GPU = 6
    NOT_SERVED = 7


@dataclass(frozen=True)
class MemoryFigures:
    """A model's memory beyond its two headline figures, each labelled (service/memory.py says how each is
    found): the estimate's parts and source, how the measurement was made, the process's RSS growth across
    the load (for the operator, never charged), and the GPUs the load allocated on (index, bytes)."""

    estimated_weights_bytes: int = 0
    estimated_kv_cache_bytes: int = 0
    estimate_source: str = ""
    measured_by: str = ""
    rss_delta_bytes: int = 0
    devices: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class GpuMemory:
    """One GPU the server may use, read when asked: its size, its part of the budget, and who holds what."""

    index: int
    name: str = ""
    uuid: str = ""
    total_bytes: int = 0
    budget_bytes: int = 0
    #: other processes and the driver
    used_by_others_bytes: int = 0
    #: this process in all, as the driver counts it (0: not known)
    process_bytes: int = 0
    #: torch's tensors and its allocator's reservation (the cache is the difference)
    allocated_bytes: int = 0
    reserved_bytes: int = 0


@dataclass(frozen=True)
class ModelSnapshot:
    """One model's place in the cache at one moment, as ListModels and the metrics read it."""

    spec: ModelSpec
    state: ModelState = ModelState.NOT_LOADED
    #: why a load failed, or what a running load is doing
    reason: str = ""
    load_seconds: float = 0.0
    #: generations running now (those waiting are ``queued``)
    running: int = 0
    queued: int = 0
    leases: int = 0
    #: expected footprint in bytes, found before the load
    estimated_bytes: int = 0
    #: what the load took, measured when it finished (0 until the model is ready)
    measured_bytes: int = 0
    #: what it holds in the memory budget now
    charged_bytes: int = 0
    memory: MemoryFigures = MemoryFigures()
    #: the load's fraction done, 0 to 1
    progress: float = 0.0
    #: seconds since the model last finished a request or a load (0 while busy or not ready)
    idle_seconds: float = 0.0
    #: whether it can run here (None: not looked at; ListModels looks), and what is missing in words
    availability: Availability | None = None
    availability_detail: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["model_name"])

    @property
    def backend(self) -> str:
        return str(self.spec["backend"])


@dataclass(frozen=True)
class CacheSnapshot:
    """The model cache at one moment: its models and the memory budget they share."""

    models: tuple[ModelSnapshot, ...]
    budget_bytes: int = 0
    used_bytes: int = 0
    #: what the budget counts: "gpu" or "ram" ("" while no local model has asked for it)
    memory_kind: str = ""
    #: the GPUs the budget covers (empty for a RAM budget), where the budget's size came from, and the
    #: KV-cache tokens an estimate allows a model's batches
    devices: tuple[GpuMemory, ...] = ()
    memory_source: str = ""
    kv_cache_tokens: int = 0


@dataclass(frozen=True)
class LeaseEvent:
    """What a lease holder is told: the lease granted (with the model's status), then its expiry."""

    lease_id: str
    model: ModelSnapshot
    expires_in_seconds: float = 0.0
    expired: bool = False


@dataclass(frozen=True)
class Row:
    """One request in a batched call: its conversation, the event set when its caller leaves (the backend
    stops the row between tokens), and where its text goes as it is generated (None: nobody streams it)."""

    messages: Sequence[Message]
    cancel: threading.Event = field(default_factory=threading.Event)
    sink: TextSink | None = None
