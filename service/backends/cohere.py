"""Cohere's v2 chat API through the ``cohere`` SDK (clembench's ``cohere`` backend, key ``cohere``).

clembench sends the merged messages as they are, passes temperature and max_tokens, requires the
reply's role to be ``assistant`` and returns the first content item's text without stripping it. It
sends no images: a registry entry that enables multimodality for a Cohere model does not change that.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from clemserve.registry import Key

from ..domain import GenArgs, Message, TextSink
from .remote import (
    RemoteBackend,
    UpstreamFailure,
    context_numbers,
    incomplete_stream,
    retry_after_seconds,
    stream_error,
)

#: Cohere's context errors (HTTP 400) all begin "too many tokens:"; the numbers come in two wordings
_TOO_MANY_TOKENS = re.compile(r"^\s*too many tokens", re.I)
#: "... cannot exceed 4081 - received 4292"
_CANNOT_EXCEED = re.compile(r"cannot exceed (\d+) - received (\d+)")
#: "size limit exceeded by 19296 tokens. ... The limit for this model is 132000 tokens."
_EXCEEDED_BY = re.compile(r"exceeded by (\d+) tokens.*?limit for this model is (\d+)", re.S)
#: "too many tokens: max tokens must be less than or equal to 4096, the maximum output for this model"
#: is about max_tokens, not the prompt: an invalid argument, not a context error
_MAX_TOKENS = re.compile(r"max[ _]tokens must be", re.I)


class CohereBackend(RemoteBackend):
    name = "cohere"
    key_name = "cohere"
    provider = "Cohere"

    def connect(self, key: Key) -> Any:
        import cohere
        from cohere.core.api_error import ApiError

        self._api_error = ApiError
        return cohere.AsyncClientV2(
            api_key=key["api_key"],
            # explicit, so that CO_API_URL in the server's environment does not redirect the key
            base_url=key.get("base_url") or None,
            timeout=self.context.retry.request_timeout_s,
            max_retries=0,  # one retry policy: RemoteBackend's
        )

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        return self.text_chat_request(messages, args)

    async def send(self, request: dict[str, Any]) -> Any:
        return await self.client.chat(**request)

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        """The events put together into the ``V2ChatResponse`` that ``chat`` returns; the first text
        item's text goes to ``piece`` (the reply's text, as ``parse`` takes it)."""
        from cohere.v2.types import V2ChatResponse

        reply: dict[str, Any] = {}
        message: dict[str, Any] = {"role": "assistant"}
        content: list[dict[str, Any]] = []
        logprobs: list[Any] = []
        text_item: int | None = None
        complete = False
        async with contextlib.aclosing(self.client.chat_stream(**request)) as stream:
            async for event in stream:
                kind = getattr(event, "type", None)
                delta = getattr(event, "delta", None)
                said = getattr(getattr(delta, "message", None), "content", None)
                if kind == "message-start":
                    reply["id"] = event.id
                    message["role"] = getattr(getattr(delta, "message", None), "role", None) or "assistant"
                elif kind == "content-start":
                    while len(content) <= event.index:
                        content.append({})
                    content[event.index] = said.model_dump(mode="json", exclude_none=True) if said else {}
                    content[event.index].setdefault("type", "text")
                    if content[event.index]["type"] == "text" and text_item is None:
                        text_item = event.index
                        piece(content[event.index].get("text") or "")
                elif kind == "content-delta" and said is not None:
                    item = content[event.index]
                    for name in ("text", "thinking"):
                        added = getattr(said, name, None)
                        if added:
                            item[name] = (item.get(name) or "") + added
                            if name == "text" and event.index == text_item:
                                piece(added)
                    if getattr(event, "logprobs", None) is not None:
                        logprobs.append(event.logprobs.model_dump(mode="json", exclude_none=True))
                elif kind == "message-end":
                    error, usage = getattr(delta, "error", None), getattr(delta, "usage", None)
                    if error:
                        raise stream_error(None, error)
                    reply["finish_reason"] = getattr(delta, "finish_reason", None)
                    if usage is not None:
                        reply["usage"] = usage.model_dump(mode="json", exclude_none=True)
                    complete = True
        if not complete:
            raise incomplete_stream()
        if content:
            message["content"] = content
        if logprobs:
            reply["logprobs"] = logprobs
        return V2ChatResponse.model_validate({**reply, "message": message})

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        message = response.message
        role = getattr(message, "role", None)
        if role != "assistant":
            raise RuntimeError(f"Cohere's response message role is {role!r} but should be 'assistant'")
        return response.model_dump(mode="json"), _text(message.content)

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        if isinstance(exc, self._api_error):
            status = exc.status_code
            reason = _error_message(exc.body)
            if status is None or 200 <= status < 300:
                # the SDK could not read a successful answer (not JSON): a garbled reply, worth a retry
                return UpstreamFailure(None, f"unreadable answer (HTTP {status}): {reason[:200]!r}")
            if status == 498:
                status = 401  # Cohere's "invalid token": the key is wrong
            context, exceeded = None, False
            if status == 400 and _TOO_MANY_TOKENS.search(reason) and not _MAX_TOKENS.search(reason):
                exceeded = True
                context = _context(reason)
            return UpstreamFailure(
                status,
                reason[:300],
                retry_after_s=retry_after_seconds(exc.headers),
                context=context,
                context_exceeded=exceeded,
            )
        if _is_transport_error(exc):
            return UpstreamFailure(None, f"{type(exc).__name__}: {exc}"[:300])
        return None


def _context(reason: str) -> tuple[int, int] | None:
    """(tokens_used, context_size) where Cohere's message gives them."""
    match = _CANNOT_EXCEED.search(reason)
    if match:
        return int(match.group(2)), int(match.group(1))
    match = _EXCEEDED_BY.search(reason)
    if match:
        over, size = int(match.group(1)), int(match.group(2))
        return size + over, size
    return context_numbers(reason)


def _error_message(body: Any) -> str:
    """Cohere's error body is ``{"id", "message"}``; anything else is shown as it came."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    if isinstance(body, (str, bytes)):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text.strip() or "(no body)"
    return repr(body)


def _is_transport_error(exc: Exception) -> bool:
    """httpx's connection errors and timeouts (the SDK's HTTP client), without importing it here."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "TransportError" in names or "TimeoutException" in names


def _text(content: Any) -> str:
    """clembench's ``content[0].text``, unstripped; the first text item when a thinking item leads."""
    for item in content or []:
        if getattr(item, "type", "text") == "text":
            return str(getattr(item, "text", "") or "")
    return ""
