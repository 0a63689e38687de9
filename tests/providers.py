"""What the remote-backend tests share: distinctive fake keys and the scan for leaked key parts."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from tests.standin import Recorded, Reply

#: distinctive fake keys, random so that redaction never meets them in ordinary words; the leak scans
#: look for any part of them longer than the last 4 characters
FAKE_KEYS = {
    "openai": "sk-u8jzPde0IgxLd6GncfBAepfJ",
    "openai_compatible": "sk-Bd0Kh8oOOL8dKLzdocJ2isAj",
    "openrouter": "sk-IhKtJ0RlgLKOmxgJTeKdNnFR",
    "azure_gpt": "sk-IBXuDL7DxtpYlSXpfKtHF4vU",
    "azure_claude": "sk-CsMehGAkWvj7FAc9QeWJKY40",
    "anthropic": "sk-uvSwMFLZDe1f8rESQedUStPK",
    "mistral": "sk-R0CsTy4Qwb8DwkNhFdnXsiVp",
    "cohere": "sk-zz63FfkCzJr4i0B3JrTAwR4y",
    "google": "sk-9ojfljoQoaF1LlqsajAIxNKu",
}


def assert_no_key_leaks(text: str) -> None:
    """No fake key, nor any part of one longer than its last 4 characters, in ``text``."""
    for name, key in FAKE_KEYS.items():
        for i in range(len(key) - 4):
            assert key[i : i + 5] not in text, f"part of the {name} key leaked: {key[i : i + 5]!r}"


def openai_reply(content: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A minimal OpenAI chat completion answering ``content`` (3 prompt tokens, 1 completion token, unless
    ``usage`` says otherwise: see :func:`openai_usage`)."""
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def openai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's usage block with its details: cached prompt tokens and reasoning tokens are parts of the totals."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


def anthropic_usage(uncached: int, output: int, cache_read: int = 0, cache_write: int = 0) -> dict[str, Any]:
    """Anthropic's usage block: its input_tokens leave out what the prompt cache read and wrote."""
    return {
        "input_tokens": uncached,
        "output_tokens": output,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
    }


def responses_reply(text: str, reply_id: str, output_tokens: int) -> dict[str, Any]:
    """A completed OpenAI Responses API reply (gpt-5-codex) holding one message with ``text`` (5 input tokens)."""
    return {
        "id": reply_id,
        "object": "response",
        "created_at": 1767225600,
        "model": "gpt-5-codex",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 5, "output_tokens": output_tokens, "total_tokens": 5 + output_tokens},
    }


class ConcurrencyCap:
    """A stand-in provider's answer (a ``StandIn.script`` responder) that takes ``limit`` calls at once, each
    answered with ``body`` after ``answer_s``, and answers a call above that at once with HTTP 429 and how long
    until its next call ends (``retry-after-ms``, and ``retry-after`` in whole seconds, as OpenAI sends them).
    It counts both, and times the first call it took and the end of the last."""

    def __init__(self, body: dict[str, Any], limit: int = 8, answer_s: float = 0.1) -> None:
        self.body, self.limit, self.answer_s = body, limit, answer_s
        self.answered = 0
        self.refused = 0
        self.most_at_once = 0
        self.first_at: float | None = None
        self.last_end_at: float | None = None
        self._ends: list[float] = []  # when each call it took ends
        self._lock = threading.Lock()

    def __call__(self, recorded: Recorded) -> Reply:
        with self._lock:
            now = time.monotonic()
            self._ends = [end for end in self._ends if end > now]
            if len(self._ends) >= self.limit:
                self.refused += 1
                wait = min(self._ends) - now
                headers = {"retry-after-ms": str(max(1, round(wait * 1000))), "retry-after": str(math.ceil(wait))}
                message = f"Rate limit reached: {self.limit} concurrent requests"
                return Reply(429, {"error": {"message": message, "type": "rate_limit_exceeded"}}, headers)
            self.answered += 1
            self._ends.append(now + self.answer_s)
            self.most_at_once = max(self.most_at_once, len(self._ends))
            self.first_at = now if self.first_at is None else self.first_at
            self.last_end_at = now + self.answer_s
        return Reply(200, self.body, delay_s=self.answer_s)

    @property
    def refused_share(self) -> float:
        return self.refused / max(1, self.answered + self.refused)

    @property
    def busy_s(self) -> float:
        """From the first call taken to the end of the last."""
        return (self.last_end_at or 0.0) - (self.first_at or 0.0)


def all_text(path: Path) -> str:
    return path.read_text(errors="replace")


# -- streamed replies: each provider's server-sent events for a reply it would send whole -----------------


def sse(*events: tuple[str | None, Any]) -> list[str]:
    """Server-sent events, one chunk each: ``(event name or None, data: a JSON value or a raw string)``."""
    chunks = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        chunks.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    return chunks


def openai_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A chat completion as OpenAI streams it with ``stream_options.include_usage``: a first chunk with the
    role, one chunk per text piece, the finish reason, then the usage in a chunk without choices, then
    ``[DONE]``. ``pieces`` concatenated must be the reply's content."""
    choice = reply["choices"][0]
    assert "".join(pieces) == (choice["message"]["content"] or "")
    head = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"], "model": reply["model"]}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events: list[tuple[str | None, Any]] = [(None, chunk({"role": choice["message"]["role"], "content": ""}))]
    events += [(None, chunk({"content": piece})) for piece in pieces]
    events.append((None, chunk({}, choice["finish_reason"])))
    events.append((None, {**head, "choices": [], "usage": reply["usage"]}))
    return [*events, (None, "[DONE]")]


def openai_error_event(message: str = "The server had an error while processing your request.") -> tuple[None, Any]:
    """An error sent inside a stream, as OpenAI-compatible servers (OpenRouter, vLLM) send one."""
    return None, {"error": {"message": message, "type": "server_error", "code": 502}}


def anthropic_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A Messages API reply as Anthropic streams it: message_start (input tokens), each block's start,
    deltas and stop (the text block's text in ``pieces``), message_delta (stop reason, output tokens),
    message_stop; with a ping."""
    start = {**reply, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**reply["usage"], "output_tokens": 1}
    events: list[tuple[str | None, Any]] = [("message_start", {"type": "message_start", "message": start})]
    events.append(("ping", {"type": "ping"}))
    for index, block in enumerate(reply["content"]):

        def delta(value: dict[str, Any], index: int = index) -> tuple[str, Any]:
            return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": value}

        if block["type"] == "text":
            assert "".join(pieces) == block["text"]
            opening = {"type": "text", "text": ""}
            deltas = [delta({"type": "text_delta", "text": piece}) for piece in pieces]
        else:  # thinking
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [delta({"type": "thinking_delta", "thinking": block["thinking"]})]
            deltas.append(delta({"type": "signature_delta", "signature": block["signature"]}))
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening})
        )
        events += deltas
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    ending = {"stop_reason": reply["stop_reason"], "stop_sequence": reply["stop_sequence"]}
    usage = {"output_tokens": reply["usage"]["output_tokens"]}
    events.append(("message_delta", {"type": "message_delta", "delta": ending, "usage": usage}))
    return [*events, ("message_stop", {"type": "message_stop"})]


def anthropic_error_event() -> tuple[str, Any]:
    return "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def mistral_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A chat completion as Mistral streams it: the role first, a chunk per piece, the finish reason and
    the usage together in the last chunk, then ``[DONE]``."""
    choice = reply["choices"][0]
    assert "".join(pieces) == choice["message"]["content"]
    head = {"id": reply["id"], "object": "chat.completion.chunk", "created": reply["created"], "model": reply["model"]}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant", "content": ""}))]
    events += [(None, chunk({"content": piece})) for piece in pieces]
    events.append((None, {**chunk({"content": ""}, choice["finish_reason"]), "usage": reply["usage"]}))
    return [*events, (None, "[DONE]")]


def cohere_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A v2 chat reply as Cohere streams it: message-start, the text item's content-start, a content-delta
    per piece, content-end, and message-end with the finish reason and usage."""
    assert "".join(pieces) == reply["message"]["content"][0]["text"]
    events: list[tuple[str | None, Any]] = [
        ("message-start", {"id": reply["id"], "type": "message-start", "delta": {"message": {"role": "assistant"}}}),
        (
            "content-start",
            {"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}},
        ),
    ]
    events += [
        ("content-delta", {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": piece}}}})
        for piece in pieces
    ]
    events.append(("content-end", {"type": "content-end", "index": 0}))
    ending = {"finish_reason": reply["finish_reason"], "usage": reply["usage"]}
    events.append(("message-end", {"type": "message-end", "delta": ending}))
    return events


def cohere_error_event() -> tuple[str, Any]:
    """A stream Cohere ends with an error: message-end with ``error`` set."""
    return "message-end", {"type": "message-end", "delta": {"finish_reason": "ERROR", "error": "internal error"}}


def gemini_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A generateContent reply as ``streamGenerateContent?alt=sse`` sends it: a response per piece, the
    last with the finish reason; each with the usage so far, the model version and the response id."""
    candidate = reply["candidates"][0]
    assert "".join(pieces) == "".join(part["text"] for part in candidate["content"]["parts"])
    rest = {k: v for k, v in reply.items() if k != "candidates"}
    events: list[tuple[str | None, Any]] = []
    for i, piece in enumerate(pieces):
        said: dict[str, Any] = {
            "content": {"role": candidate["content"]["role"], "parts": [{"text": piece}]},
            "index": 0,
        }
        if i == len(pieces) - 1:
            said["finishReason"] = candidate["finishReason"]
        events.append((None, {"candidates": [said], **rest}))
    return events


def gemini_error_event() -> tuple[None, Any]:
    return None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}


def responses_events(reply: dict[str, Any], pieces: list[str]) -> list[tuple[str | None, Any]]:
    """A Responses API reply as it streams: created, a delta per piece, completed with the whole response."""
    started = {**reply, "status": "in_progress", "output": []}
    events: list[tuple[str | None, Any]] = [("response.created", {"type": "response.created", "response": started})]
    for n, piece in enumerate(pieces):
        delta = {
            "type": "response.output_text.delta", "item_id": reply["output"][0]["id"], "output_index": 0,
            "content_index": 0, "delta": piece, "sequence_number": n + 1, "logprobs": [],
        }  # fmt: skip
        events.append(("response.output_text.delta", delta))
    completed = {"type": "response.completed", "response": reply, "sequence_number": len(pieces) + 1}
    return [*events, ("response.completed", completed)]


def responses_error_event() -> tuple[str, Any]:
    return "error", {
        "type": "error",
        "code": "server_error",
        "message": "The server had an error.",
        "sequence_number": 99,
    }
