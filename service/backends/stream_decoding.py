"""A batch's text as it is generated, for ``huggingface_local``'s streamed requests.

transformers hands a streamer each step's new tokens for the whole batch, in the generation thread;
:class:`BatchStreamer` decodes each streamed row's tokens as they come and sends the text to the row's
sink, which :func:`on_loop` has made safe to call from that thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ..domain import Row, TextSink


def on_loop(loop: asyncio.AbstractEventLoop, sink: TextSink | None) -> TextSink | None:
    """``sink``, callable from the generation thread: each piece is handed to the event loop."""
    if sink is None:
        return None

    def hand_over(piece: str) -> None:
        loop.call_soon_threadsafe(sink, piece)

    return hand_over


class IncrementalDecoder:
    """One row's text as its tokens arrive: each new token yields the text it adds. A token that ends in
    the middle of a multi-byte character (decoded as U+FFFD) is held back until the character is whole."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._sent = 0

    def push(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._tokens)  # the whole row each time: exactly the final decode's text
        if text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent :], len(text)
        return piece

    def flush(self) -> str:
        """What is still held back once no token follows (an incomplete character, as the final decode has it)."""
        text = self._decode(self._tokens)
        piece, self._sent = text[self._sent :], len(text)
        return piece


class BatchStreamer:
    """transformers' streamer interface for a whole batch, called from the generation thread: the first
    ``put`` is the prompts, then one new token per row per step. A row's text goes to its sink until its
    end-of-sequence token (included, as the reply's raw text keeps special tokens) or its caller leaves;
    padding after that and rows without a sink emit nothing."""

    def __init__(self, tokenizer: Any, rows: Sequence[Row], eos: set[int]) -> None:
        self._rows = [(row.sink, row.cancel, IncrementalDecoder(tokenizer.decode)) for row in rows]
        self._eos = eos
        self._open = [row.sink is not None for row in rows]

    def put(self, value: Any) -> None:
        if value.dim() > 1:
            return  # the prompts
        for row, token in enumerate(value.tolist()):
            sink, cancel, decoder = self._rows[row]
            if not self._open[row] or cancel.is_set():
                continue
            self._send(sink, decoder.push(int(token)))
            if token in self._eos:
                self._open[row] = False

    def end(self) -> None:
        """The rows cut at max_tokens: what they held back, so the pieces add up to the decoded text."""
        for row, (sink, cancel, decoder) in enumerate(self._rows):
            if self._open[row] and not cancel.is_set():
                self._send(sink, decoder.flush())

    @staticmethod
    def _send(sink: TextSink | None, piece: str) -> None:
        if piece and sink is not None:
            sink(piece)
