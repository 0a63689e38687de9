"""Mistral's chat API through the ``mistralai`` SDK (clembench's ``mistral`` backend, key ``mistral``).

clembench sends the merged messages as they are, passes temperature and max_tokens, requires the
reply's role to be ``assistant`` and strips the text. It sends no images: a registry entry that enables
multimodality for a Mistral model does not change that, so images are refused rather than dropped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from clemserve.registry import Key

from ..domain import GenArgs, Message, TextSink
from .remote import (
    RemoteBackend,
    UpstreamFailure,
    context_numbers,
    incomplete_stream,
    looks_like_context_error,
    retry_after_seconds,
)


class MistralBackend(RemoteBackend):
    name = "mistral"
    key_name = "mistral"
    provider = "Mistral"

    def connect(self, key: Key) -> Any:
        from mistralai.client import Mistral
        from mistralai.client.errors import MistralError, NoResponseError, ResponseValidationError
        from mistralai.client.utils import BackoffStrategy, RetryConfig
        from mistralai.client.utils.logger import NoOpLogger

        self._mistral_error = MistralError
        self._no_response = NoResponseError
        self._unreadable = ResponseValidationError
        return Mistral(
            api_key=key["api_key"],
            server_url=key.get("base_url") or None,
            # one retry policy: RemoteBackend's
            retry_config=RetryConfig("none", BackoffStrategy(0, 0, 1, 0), retry_connection_errors=False),
            timeout_ms=int(self.context.retry.request_timeout_s * 1000),
            # the SDK's default logger (MISTRAL_DEBUG) would log request headers, the API key among them
            debug_logger=NoOpLogger(),
        )

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        return self.text_chat_request(messages, args)

    async def send(self, request: dict[str, Any]) -> Any:
        try:
            return await self.client.chat.complete_async(**request)
        except self._unreadable as exc:
            # the SDK refuses a reply whose role is not "assistant" before we see it
            role = _reply_role(exc.body)
            if role is not None and role != "assistant":
                raise RuntimeError(f"Mistral's response message role is {role!r} but should be 'assistant'") from None
            raise

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        """The chunks put together into the ``ChatCompletionResponse`` that ``complete_async`` returns."""
        from mistralai.client.models import ChatCompletionResponse

        head: dict[str, Any] = {}
        choices: dict[int, dict[str, Any]] = {}
        stream = await self.client.chat.stream_async(**request)
        async with stream:
            async for event in stream:
                chunk = event.data.model_dump(mode="json")
                head.update({k: v for k, v in chunk.items() if k != "choices" and v is not None})
                for choice in chunk.get("choices") or []:
                    index = choice["index"]
                    into = choices.setdefault(index, {"index": index, "message": {}, "finish_reason": None})
                    if choice.get("finish_reason") is not None:
                        into["finish_reason"] = choice["finish_reason"]
                    delta = choice.get("delta") or {}
                    message = into["message"]
                    if delta.get("role"):
                        message["role"] = delta["role"]
                    if delta.get("tool_calls"):
                        message["tool_calls"] = [*(message.get("tool_calls") or []), *delta["tool_calls"]]
                    added = _add_content(message, delta.get("content"))
                    if index == 0:
                        piece(added)
        if not choices or any(choice["finish_reason"] is None for choice in choices.values()):
            raise incomplete_stream()
        for choice in choices.values():
            choice["message"].setdefault("role", "assistant")
        head["object"] = "chat.completion"
        return ChatCompletionResponse.model_validate({**head, "choices": [choices[i] for i in sorted(choices)]})

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        message = response.choices[0].message
        if message.role != "assistant":
            raise RuntimeError(f"Mistral's response message role is {message.role!r} but should be 'assistant'")
        return response.model_dump(mode="json"), _text(message.content).strip()

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        if isinstance(exc, self._mistral_error):
            if isinstance(exc, self._unreadable) and not _is_json(exc.body):
                return UpstreamFailure(None, f"unreadable answer (HTTP {exc.status_code}): {exc.body[:200]!r}")
            if isinstance(exc, self._unreadable):
                return None  # well-formed JSON the SDK cannot read: a bug to log, not to retry
            return _http_failure(exc.status_code, exc.body, exc.headers)
        if isinstance(exc, self._no_response) or _is_transport_error(exc):
            return UpstreamFailure(None, f"{type(exc).__name__}: {exc}"[:300])
        return None


def _http_failure(status: int, body: str, headers: Any) -> UpstreamFailure:
    reason, kind = _error_message(body)
    if status == 400 and kind == "invalid_model":
        status = 404  # Mistral answers an unknown model with 400 "Invalid model: ..."
    context = context_numbers(reason) if status == 400 else None  # knows Mistral's "Prompt contains N tokens"
    exceeded = status == 400 and (context is not None or looks_like_context_error(reason))
    return UpstreamFailure(
        status,
        reason[:300],
        retry_after_s=retry_after_seconds(headers),
        context=context,
        context_exceeded=exceeded,
    )


def _error_message(body: str) -> tuple[str, str]:
    """(message, type) from Mistral's error body ``{"object": "error", "message", "type", ...}``."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip() or "(no body)", ""
    if not isinstance(data, dict):
        return body.strip(), ""
    message = data.get("message", data.get("detail", body))
    if not isinstance(message, str):
        message = json.dumps(message)
    return message, str(data.get("type") or "")


def _reply_role(body: str) -> str | None:
    try:
        return str(json.loads(body)["choices"][0]["message"]["role"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _is_json(body: str) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _is_transport_error(exc: Exception) -> bool:
    """httpx2's connection errors and timeouts (the SDK's HTTP client), without importing it here."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "TransportError" in names or "TimeoutException" in names


def _add_content(message: dict[str, Any], content: Any) -> str:
    """Add a delta's content to the message's (text concatenated; reasoning models' chunk lists extended,
    adjacent text chunks joined); returns the text it adds."""
    if content is None:
        return ""
    held = message.get("content")
    if isinstance(content, str):
        if isinstance(held, list):
            content = [{"type": "text", "text": content}]
        else:
            message["content"] = (held or "") + content
            return content
    chunks: list[dict[str, Any]] = [{"type": "text", "text": held}] if isinstance(held, str) and held else []
    chunks = held if isinstance(held, list) else chunks
    added = ""
    for chunk in content:
        if chunk.get("type") == "text":
            added += chunk.get("text") or ""
            if chunks and chunks[-1].get("type") == "text":
                chunks[-1] = {**chunks[-1], "text": (chunks[-1].get("text") or "") + (chunk.get("text") or "")}
                continue
        chunks.append(chunk)
    message["content"] = chunks
    return added


def _text(content: Any) -> str:
    """clembench's ``content or ""``; reasoning models answer with chunks, whose text parts are joined."""
    if isinstance(content, list):
        return "".join(getattr(chunk, "text", "") or "" for chunk in content if getattr(chunk, "type", "") == "text")
    return content or ""
