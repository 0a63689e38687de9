"""The backend interface: load, generate, count tokens, unload.

A backend module imports its heavy dependencies (torch, transformers, vllm, provider SDKs) inside
``load`` so that a server with no such model loaded never imports them. Blocking work runs off the
event loop: each backend decides how (a worker thread for transformers, async SDKs for remote APIs).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import FailedPreconditionError

from ..domain import GenArgs, Generation, Message, TokenCount

#: called with a short human-readable line while a load makes progress
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BackendContext:
    """What the server hands every backend."""

    keys: KeyRegistry
    cache_dir: Path


class Backend(abc.ABC):
    """One loaded model. Created per resolved spec; ``load`` runs once before any other call."""

    #: the registry's ``backend`` value this class serves
    name: ClassVar[str]
    #: generation arguments beyond temperature and max_tokens that this backend honours
    supported_args: ClassVar[tuple[str, ...]] = ()

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

    @abc.abstractmethod
    async def generate(self, messages: Sequence[Message], args: GenArgs) -> Generation:
        """One conversation -> one Generation (messages are validated and merged already)."""

    async def generate_batch(self, rows: Sequence[Sequence[Message]], args: GenArgs) -> list[Generation]:
        """Many conversations; backends that batch natively override this."""
        return list(await asyncio.gather(*(self.generate(row, args) for row in rows)))

    @abc.abstractmethod
    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount: ...

    async def unload(self) -> None:  # noqa: B027 - optional hook
        """Free what ``load`` took."""


def missing_dependency(backend: str, extra: str, exc: ImportError) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"backend {backend} needs the Python package {exc.name or 'that is missing'}: "
        f"install it with pip install 'clemserve[{extra}]'",
        subject=f"pip install 'clemserve[{extra}]'",
    )
