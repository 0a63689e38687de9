"""The backend interface: load, generate, count tokens, unload.

A backend has one way to generate for the scheduler: ``generate``, one conversation per call, or, for a
:class:`BatchingBackend`, ``generate_rows``, the waiting requests the scheduler merged into one call.

A backend module imports its heavy dependencies (torch, transformers, vllm, provider SDKs) inside
``load`` so that a server with no such model loaded never imports them. Blocking work runs off the
event loop: each backend decides how (a worker thread for transformers, async SDKs for remote APIs).
"""

from __future__ import annotations

import abc
import logging
import os
import random
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import FailedPreconditionError, UnavailableError

from ..devices import Grant
from ..domain import GenArgs, Generation, Message, Outcome, PrefixReuse, Row, TextSink, TokenCount
from ..security.redaction import Redactor
from ..validation import reject_unsupported_args
from .rate_limits import RateLimits

log = logging.getLogger(__name__)


#: told, on the event loop, a merged row's outcome (by its index) as soon as it is known, before its batch ends
RowDone = Callable[[int, Outcome], None]


class Progress(Protocol):
    """Called with a short human-readable line while a load makes progress, and the fraction done (0 to 1)
    where the backend can tell (streamed requests and ListModels show it)."""

    def __call__(self, line: str, fraction: float | None = None) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How remote calls are retried. ``attempts`` counts every try, the first included."""

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    #: one HTTP request's limit, independent of the caller's deadline
    request_timeout_s: float = 300.0

    def delay(self, retry: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None and retry_after_s >= 0:
            return min(retry_after_s, self.max_delay_s)
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**retry))


@dataclass(frozen=True)
class BackendContext:
    """What the server hands every backend."""

    keys: KeyRegistry
    cache_dir: Path
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: scrubs the keys above out of any text that leaves the server
    redactor: Redactor = field(default_factory=Redactor)
    #: how much lower the CPU priority of local generation threads is than the server's (a nice increment);
    #: models on the CPU only (a GPU model's thread launches kernels and keeps the server's priority)
    compute_nice: int = 0
    #: let a model meant for GPUs run some layers on the CPU or disk when it does not fit (--allow-offload)
    allow_offload: bool = False
    #: what admission granted this load: the GPUs the model goes to and the bytes on each (none: not placed)
    grant: Grant = field(default_factory=Grant)
    #: bytes of a transformers model's prefix cache (--prefix-cache): None, the default for the model's dtype
    #: (docs/prefix-cache.md); 0: off
    prefix_cache_bytes: int | None = None
    #: the limiters remote calls wait in, per key entry or backend (--rate-limit)
    rate_limits: RateLimits = field(default_factory=RateLimits)


def lower_thread_priority(increment: int) -> None:
    """Lower the calling thread's CPU priority by ``increment`` nice steps (Linux, where nice is per
    thread; threads it starts later, such as torch's, inherit it). Elsewhere, or when refused, nothing."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))
    except OSError as exc:
        log.debug("could not lower the generation thread's priority: %s", exc)


class Backend(abc.ABC):
    """One loaded model. Created per resolved spec; ``load`` runs once before any other call."""

    #: the registry's ``backend`` value this class serves
    name: ClassVar[str]
    #: generation arguments beyond temperature and max_tokens that this backend honours
    supported_args: ClassVar[tuple[str, ...]] = ()
    #: calls the scheduler runs on this backend at once (engines and remote APIs batch or fan out themselves)
    concurrency: ClassVar[int] = 256
    #: whether the scheduler merges waiting requests into ``generate_rows`` calls (a :class:`BatchingBackend`)
    batches: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, context: BackendContext) -> None:
        self.spec = spec
        self.context = context

    @property
    def model_name(self) -> str:
        return str(self.spec["model_name"])

    @property
    def model_config(self) -> dict[str, Any]:
        config = self.spec.get("model_config", {})
        return dict(config) if isinstance(config, dict) else {}

    @abc.abstractmethod
    async def load(self, progress: Progress) -> None: ...

    def check_args(self, args: GenArgs) -> None:
        """Refuse generation arguments this backend cannot honour, before the request is queued (nothing is
        ignored silently). The server calls it once per request, before any backend method."""
        reject_unsupported_args(args.extra, self.supported_args, self.name)

    @abc.abstractmethod
    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        """One conversation -> one Generation (messages are validated and merged already). ``sink`` is a
        streamed request's: a backend that produces its text piece by piece sends each piece there; one that
        cannot says nothing, and the manager sends the whole text as one piece when the reply arrives."""

    async def generate_rows(self, rows: Sequence[Row], args: GenArgs, done: RowDone | None = None) -> list[Outcome]:
        """Only a :class:`BatchingBackend` generates this way."""
        raise NotImplementedError

    @abc.abstractmethod
    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount: ...

    def prefix_reuse(self) -> PrefixReuse:
        """What this model does with prompt prefixes it computed before, for provenance and ListModels."""
        return PrefixReuse()

    async def unload(self) -> None:  # noqa: B027 - optional hook
        """Free what ``load`` took."""


class BatchingBackend(Backend):
    """A backend whose one way to generate is ``generate_rows``: the scheduler merges waiting requests
    (with the same arguments) into one call, and never calls ``generate`` on it."""

    batches = True

    @abc.abstractmethod
    async def generate_rows(self, rows: Sequence[Row], args: GenArgs, done: RowDone | None = None) -> list[Outcome]:
        """Independent requests in one call; each row's error is its own, a row with a text sink is told its
        text as it is generated, a row whose cancel event is set may stop, and ``done`` may be told a row's
        outcome before the call returns (the returned list still holds every row, in order)."""

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        """A batch of one."""
        (outcome,) = await self.generate_rows([Row(messages, sink=sink)], args)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def stream_words(text: str, sink: TextSink | None) -> None:
    """Send ``text`` word by word (keeping its spaces) to a streamed request's sink, if there is one: the
    diagnostic backends stream this way so that streaming can be tested without a model."""
    if sink is not None:
        for piece in re.findall(r"\s*\S+|\s+$", text):
            sink(piece)


class BackendDeadError(UnavailableError):
    """The backend's engine stopped. The server drops the model; the next request loads it again."""

    reason = "BACKEND_DEAD"


#: extras whose packages pip cannot simply install into the server's environment: the checkout's make target
_INSTALL_ROUTES = {
    # PyPI ships llama-cpp-python as source: the target builds its wheel once and installs it into .venv
    "llamacpp": "make llamacpp-env in the clemserve checkout (or pip install '/path/to/clemserve[llamacpp]', "
    "which compiles llama.cpp)",
    # vLLM pins its own transformers, which conflict with the main environment's
    "vllm": "make vllm-env in the clemserve checkout, and serve from .venv-vllm "
    "(or pip install '/path/to/clemserve[vllm]' into an environment of its own)",
}


def install_route(extra: str) -> str:
    """How a server gets the packages of ``extra``. clemserve is not on PyPI: from a checkout (or the wheel
    ``make wheel`` builds), through the checkout's make target where one builds what pip cannot."""
    return _INSTALL_ROUTES.get(extra, f"pip install '/path/to/clemserve[{extra}]'")


def missing_dependency(backend: str, extra: str, exc: ImportError) -> FailedPreconditionError:
    route = install_route(extra)
    return FailedPreconditionError(
        f"backend {backend} needs the Python package {exc.name or 'that is missing'}: install it with {route}",
        subject=route,
    )
