"""Anthropic's Messages API through ``anthropic.AsyncAnthropic`` (clembench backend ``anthropic``).

As clembench: system messages leave the list (the last one wins, default ``""``) and go as ``system``;
every other message becomes ``{"role", "content": [text block, image blocks...]}``; only temperature
and max_tokens are sent; ``thinking_mode`` adds a 4000-token thinking budget on top of max_tokens at
temperature 1; the text is not stripped.

Where this differs from clembench, on purpose:
- ``thinking_mode`` is read by value (clembench: its presence).
- The text comes from the first block of type ``text`` (clembench: ``content[0]``, or ``content[1]``
  in thinking mode, which assumes the thinking block comes first and raises IndexError on an empty
  content list; here an answer without a text block gives ``""``).
- An image the caller named by http(s) URL is sent as a ``url`` image source, for Anthropic to fetch,
  instead of being downloaded here (clembench downloads it and sends base64).
- Anthropic's 529 (overloaded) is retried like a 503.

The SDK (anthropic 2.x) sends API version 2026-10-21 and has no ``temperature`` argument any more (that
version answers 400 to it), so clembench's request cannot be made through its keyword arguments: this
backend pins ``anthropic-version`` to 2023-06-01, the version clembench's requests were written for, and
sends ``temperature`` in the body (``extra_body``), so the request on the wire is clembench's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from clemserve.registry import Key

from ..domain import GenArgs, ImagePart, Message, TextSink
from .remote import (
    STREAM_ERROR_STATUS,
    RemoteBackend,
    UpstreamFailure,
    context_numbers,
    flag,
    image_base64,
    image_mime,
    incomplete_stream,
    looks_like_context_error,
    retry_after_seconds,
)

THINKING_BUDGET = 4000
#: the API version clembench's requests were written for; it still takes ``temperature``
API_VERSION = "2023-06-01"
#: Anthropic's "overloaded" status; transient, retried as a 503
OVERLOADED = 529
#: "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, ..."


def _image_block(image: ImagePart) -> dict[str, Any]:
    if image.source.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": image.source}}
    return {"type": "image", "source": {"type": "base64", "media_type": image_mime(image), "data": image_base64(image)}}


def encode_messages(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], str]:
    """(the message list Anthropic is sent, the system prompt)."""
    encoded: list[dict[str, Any]] = []
    system = ""
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
            continue
        content: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}]
        content.extend(_image_block(image) for image in message.get("image") or [])
        encoded.append({"role": message["role"], "content": content})
    return encoded, system


class AnthropicBackend(RemoteBackend):
    name = "anthropic"
    key_name = "anthropic"
    provider = "Anthropic"

    def connect(self, key: Key) -> Any:
        import anthropic

        self.sdk = anthropic
        options: dict[str, Any] = {}
        if key.get("base_url"):
            options["base_url"] = key["base_url"]
        # An explicit timeout also stops the SDK from refusing large max_tokens without streaming;
        # the caller's deadline still bounds every call (RemoteBackend.call).
        return anthropic.AsyncAnthropic(
            api_key=key["api_key"],
            max_retries=0,
            timeout=self.context.retry.request_timeout_s,
            default_headers={"anthropic-version": API_VERSION},
            **options,
        )

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        prompt, system = encode_messages(messages)
        temperature, max_tokens = args.temperature, args.max_tokens
        request: dict[str, Any] = {"model": self.model_id, "messages": prompt, "system": system}
        if flag(self.model_config, "thinking_mode"):
            temperature, max_tokens = 1.0, THINKING_BUDGET + args.max_tokens
            request["thinking"] = {"type": "enabled", "budget_tokens": THINKING_BUDGET}
        request["max_tokens"] = max_tokens
        request["extra_body"] = {"temperature": temperature}  # not an argument of the 2.x SDK any more
        return prompt, request

    async def send(self, request: dict[str, Any]) -> Any:
        return await self.client.messages.create(**request)

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        return await stream_message(self.client, request, piece)

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        return parse_message(response)

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        return classify_anthropic(self.sdk, exc)


def parse_message(response: Any) -> tuple[dict[str, Any], str]:
    """An Anthropic message as clembench returns it: the dump and the first text block, not stripped
    (clembench reads content[0], or content[1] with thinking on). Shared with Azure's Claude route."""
    role = getattr(response, "role", None)
    if role != "assistant":
        raise RuntimeError(f"Anthropic answered with role {role!r}; expected 'assistant'")
    blocks = getattr(response, "content", None) or []
    text = next((block.text for block in blocks if getattr(block, "type", None) == "text"), "")
    return response.model_dump(mode="json"), text or ""


async def stream_message(client: Any, request: dict[str, Any], piece: TextSink) -> Any:
    """One streamed message: the first text block's text to ``piece`` as it arrives; returns the ``Message``
    that ``messages.create`` returns for the same request, put together from the stream's events as the
    API would have sent it whole (blocks, stop reason, usage). Shared with Azure's Claude route."""
    from anthropic.types import Message as AnthropicMessage

    message: dict[str, Any] | None = None
    text_block: int | None = None  # the index of the first text block: the reply's text (parse_message)
    partial_json: dict[int, str] = {}
    complete = False
    stream = await client.messages.create(**request, stream=True)
    async with stream:
        async for event in stream:
            kind = event.type
            if kind == "message_start":
                message = event.message.model_dump(mode="json")
                message["content"] = []
            elif message is None:
                continue
            elif kind == "content_block_start":
                block = event.content_block.model_dump(mode="json")
                while len(message["content"]) <= event.index:
                    message["content"].append(None)
                message["content"][event.index] = block
                if block.get("type") == "text" and text_block is None:
                    text_block = event.index
                    piece(block.get("text") or "")
            elif kind == "content_block_delta":
                block, delta = message["content"][event.index], event.delta
                if delta.type == "text_delta":
                    block["text"] = (block.get("text") or "") + delta.text
                    if event.index == text_block:
                        piece(delta.text)
                elif delta.type == "thinking_delta":
                    block["thinking"] = (block.get("thinking") or "") + delta.thinking
                elif delta.type == "signature_delta":
                    block["signature"] = delta.signature
                elif delta.type == "input_json_delta":
                    partial_json[event.index] = partial_json.get(event.index, "") + delta.partial_json
                elif delta.type == "citations_delta":
                    block["citations"] = [*(block.get("citations") or []), delta.citation.model_dump(mode="json")]
            elif kind == "content_block_stop" and event.index in partial_json:
                message["content"][event.index]["input"] = json.loads(partial_json.pop(event.index) or "{}")
            elif kind == "message_delta":
                message["stop_reason"] = event.delta.stop_reason
                message["stop_sequence"] = event.delta.stop_sequence
                usage = event.usage.model_dump(mode="json", exclude_none=True)
                message["usage"] = {**(message.get("usage") or {}), **usage}
            elif kind == "message_stop":
                complete = True
    if message is None or not complete:
        raise incomplete_stream()
    return AnthropicMessage.model_validate(message)


def classify_anthropic(sdk: Any, exc: Exception) -> UpstreamFailure | None:
    """The anthropic SDK's exceptions as UpstreamFailures (``sdk`` is the imported module). Shared with
    Azure's Claude route."""
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        if 200 <= status < 300:  # an error event inside a stream: its type says what the status would be
            status = STREAM_ERROR_STATUS.get(str(exc.type), 500)
        reason = _reason(exc)
        retry_after = retry_after_seconds(exc.response.headers)
        if status == OVERLOADED:
            return UpstreamFailure(503, f"HTTP {OVERLOADED} {reason}", retry_after)
        if status == 400:
            numbers = context_numbers(reason)
            exceeded = numbers is not None or looks_like_context_error(reason)
            return UpstreamFailure(status, reason, retry_after, context=numbers, context_exceeded=exceeded)
        return UpstreamFailure(status, reason, retry_after)
    if isinstance(exc, sdk.APIConnectionError):  # timeouts included
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        return UpstreamFailure(None, f"{exc.message[:300]}{cause}")
    if isinstance(exc, json.JSONDecodeError):
        # a reply that is not JSON: a proxy's error page or a cut-off body; the provider's fault, and
        # usually gone on the next try, so a transient 502 rather than INTERNAL
        return UpstreamFailure(502, f"a reply that is not JSON ({exc.msg})")
    return None


def _reason(exc: Any) -> str:
    """Anthropic's own words: ``error.message`` (with ``error.type``) from the body, else the body."""
    message = exc.api_message
    if isinstance(message, str) and message:
        kind = exc.type if isinstance(exc.type, str) else ""
        return (f"{kind}: {message}" if kind else message)[:300]
    body = exc.body
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return str(body or exc.message)[:300]
