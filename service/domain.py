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
    #: prompt tokens whose states a prefix cache served instead of computing them (huggingface_local), or
    #: that the provider's prompt cache served (remote backends; priced at its cached-input price)
    cached_prompt_tokens: int = 0
    #: of completion_tokens, the model's reasoning tokens, where the provider reports them
    reasoning_tokens: int = 0
    #: of prompt_tokens, those the provider wrote to its prompt cache (Anthropic; priced at its cache-write price)
    cache_write_tokens: int = 0
    #: seconds from leaving the queue to the reply (the scheduler's measure; local models' compute seconds)
    generation_seconds: float = 0.0
    #: what the call cost (service/pricing.py), set once the call is done
    cost: Cost | None = None


@dataclass(frozen=True)
class Cost:
    """One call's cost: US dollars at the model's prices (a paid API), or compute seconds (a model the server
    runs, whose money cost is 0). ``unpriced`` says why a paid call has no price (its usd is then 0)."""

    usd: float = 0.0
    unpriced: str = ""
    #: where the price came from ("genai-prices 0.2.5", "model_config.price", "--prices FILE", "local")
    source: str = ""
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class Spend:
    """A model's calls summed: tokens, money, compute seconds, and the calls that had no price (with the last
    reason)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    compute_seconds: float = 0.0
    unpriced_calls: int = 0
    unpriced: str = ""

    def add(self, generation: Generation) -> Spend:
        """This total with one more call (its ``cost`` set)."""
        cost = generation.cost or Cost()
        return Spend(
            self.calls + 1,
            self.prompt_tokens + generation.prompt_tokens,
            self.completion_tokens + generation.completion_tokens,
            self.cached_prompt_tokens + generation.cached_prompt_tokens,
            self.reasoning_tokens + generation.reasoning_tokens,
            self.cost_usd + cost.usd,
            self.compute_seconds + cost.compute_seconds,
            self.unpriced_calls + bool(cost.unpriced),
            cost.unpriced or self.unpriced,
        )


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
class PrefixReuse:
    """What a loaded model does with prompt prefixes it computed before (docs/prefix-cache.md): in words ("" where
    its backend cannot tell), and the bytes its prefix cache holds now (0 where the engine keeps them itself)."""

    in_force: str = ""
    bytes: int = 0


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
    #: its usage and cost since the server started (by model name; ListModels fills it)
    spend: Spend = Spend()
    #: its prefix reuse, while it is loaded
    prefix: PrefixReuse = PrefixReuse()

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
