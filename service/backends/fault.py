"""The diagnostic ``fault`` backend: fails and stalls on purpose, so that the server's handling of a
failing backend can be exercised through the real server and client.

Configured only by a registry entry's ``model_config`` (no registry that ships with clemserve names it):

- ``raise_on`` (str): a RuntimeError when the last user message contains it (an unexpected backend bug)
- ``oom_on`` (str): a MemoryError when the last user message contains it (out of memory while generating)
- ``oom_on_load`` (int, or true for 1): the first N loads of this model name in this server process
  fail with MemoryError; later loads succeed
- ``gate`` (str): a file's path; while that file exists, every call waits before answering (looking every
  10 ms, without blocking the event loop). A test creates the file to hold calls in flight and removes it to
  let them go, so that it waits exactly as long as it needs; a caller that goes away ends the wait
- ``sleep_s`` (float): every call sleeps this long before answering (without blocking the event loop)
- ``stream_tokens`` (int) with ``token_delay_s`` (float): a slow generation of that many tokens, one per
  delay; a caller that goes away stops it, and the log says after how many tokens
- ``load_delay_s`` (float): every load takes this long (a slow load, for load bounds and timeouts)
- ``memory_bytes`` (int): the footprint the server's memory budget counts for it (read by
  ``service/memory.py``, as for any backend); nothing is allocated

Otherwise it answers like ``echo``: the last user message, cut to ``max_tokens`` words.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..domain import FinishReason, GenArgs, Generation, Message, TextSink, TokenCount
from .base import Backend, Progress, stream_words

log = logging.getLogger(__name__)

CONTEXT_SIZE = 131072
#: how often a call held at the gate looks again
GATE_POLL_S = 0.01


class FaultBackend(Backend):
    name = "fault"
    #: loads started per model name in this process, for ``oom_on_load``
    _loads: ClassVar[dict[str, int]] = {}

    def _number(self, key: str, default: float = 0.0) -> float:
        value: Any = self.model_config.get(key, default)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    async def load(self, progress: Progress) -> None:
        loads = self._loads[self.model_name] = self._loads.get(self.model_name, 0) + 1
        failing = self.model_config.get("oom_on_load", 0)
        failing = 1 if failing is True else failing if isinstance(failing, int) else 0
        progress(f"fault backend load {loads}")
        await asyncio.sleep(self._number("load_delay_s"))
        if loads <= failing:
            raise MemoryError(f"fault backend: load {loads} of {self.model_name} fails as configured")

    async def unload(self) -> None:
        log.info("fault backend %s: unloaded", self.model_name)

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return TokenCount(len(prompt.split()), CONTEXT_SIZE, prompt)

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        config = self.model_config
        if config.get("raise_on") and str(config["raise_on"]) in last_user:
            raise RuntimeError(f"fault backend: {config['raise_on']!r} in the message")
        if config.get("oom_on") and str(config["oom_on"]) in last_user:
            raise MemoryError(f"fault backend: {config['oom_on']!r} in the message")
        await self._wait_at_gate()
        await asyncio.sleep(self._number("sleep_s"))
        words = await self._stream(args.max_tokens, sink) if "stream_tokens" in config else last_user.split()
        text = " ".join(words[: args.max_tokens])
        if "stream_tokens" not in config:
            stream_words(text, sink)
        count = await self.count_tokens(messages)
        return Generation(
            prompt=[dict(m) for m in messages],
            response={"response": text},
            text=text,
            prompt_tokens=count.prompt_tokens,
            completion_tokens=min(len(words), args.max_tokens),
            finish_reason=FinishReason.LENGTH if len(words) > args.max_tokens else FinishReason.STOP,
        )

    async def _wait_at_gate(self) -> None:
        gate = self.model_config.get("gate")
        if not isinstance(gate, str) or not gate:
            return
        path = Path(gate)
        while path.exists():
            await asyncio.sleep(GATE_POLL_S)

    async def _stream(self, max_tokens: int, sink: TextSink | None) -> list[str]:
        """The slow generation; the tokens within ``max_tokens`` (the reply's text) stream as they come."""
        total, delay = int(self._number("stream_tokens")), self._number("token_delay_s")
        words: list[str] = []
        try:
            for i in range(total):
                await asyncio.sleep(delay)
                words.append(f"t{i}")
                if sink is not None and i < max_tokens:
                    sink(f"t{i}" if i == 0 else f" t{i}")
        except asyncio.CancelledError:
            log.info("fault backend %s: generation stopped after %d of %d tokens", self.model_name, len(words), total)
            raise
        return words
