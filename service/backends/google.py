"""Google's Gemini API through ``google.genai.Client(...).aio`` (clembench backend ``google``).

As clembench: system messages leave the list and the first one's content, when not empty, becomes
``system_instruction``; assistant messages go as role ``model``, user messages as a text part followed by
their images; only temperature and max_tokens are sent (as ``max_output_tokens``), with the four
BLOCK_MEDIUM_AND_ABOVE safety settings; ``thinking_mode`` adds a 4096-token thinking budget on top of
max_tokens; the text is ``(response.text or "").strip()``.

Where this differs from clembench, on purpose:
- Images travel inline (``inline_data``, base64 in the request) instead of being uploaded with the Files
  API on every call; an image the caller named by http(s) URL is sent as ``file_data`` with that URL,
  for Google to fetch.
- The prompt object is the ``Content`` list as JSON (``model_dump(mode="json", exclude_none=True)``);
  clembench returns the ``Content`` objects themselves, which JSON logging cannot write.
- ``thinking_mode`` is read by value (clembench: its presence).
- A reply without candidates (a prompt blocked by the safety settings) gives ``""``, as
  ``(response.text or "")`` does; only a candidate in a role other than ``model`` is an error.
- Gemini's 400 "API key not valid" is treated as the 401 it means; its ``RetryInfo`` delay is honoured
  like a ``Retry-After`` header.

Requests go to the API version clembench's SDK (google-genai 1.x) uses, ``v1beta``, set explicitly: newer
SDKs default to ``v1``, where features clembench entries use (``thinking_mode``'s thinking configuration)
arrive later. ``api_version`` in the entry's ``model_config``, else in the ``google`` key entry, chooses
another on purpose.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from clemserve.registry import FailedPreconditionError, Key

from ..domain import GenArgs, ImagePart, Message, TextSink
from .remote import (
    RemoteBackend,
    UpstreamFailure,
    context_numbers,
    flag,
    image_mime,
    incomplete_stream,
    json_ready,
    looks_like_context_error,
    retry_after_seconds,
)

THINKING_BUDGET = 4096
#: the Gemini API version of clemcore's pinned google-genai (1.x); 2.x and later default to v1
API_VERSION = "v1beta"
_API_VERSION = re.compile(r"^v\d+[a-z0-9]*$")
SAFETY_CATEGORIES = (
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


class GoogleBackend(RemoteBackend):
    name = "google"
    key_name = "google"
    provider = "Google"

    def connect(self, key: Key) -> Any:
        from google import genai
        from google.genai import errors, types

        self.types = types
        self.errors = errors
        self.transport_errors = _transport_errors()
        # attempts=1: no retries in the SDK. Leaving retry_options unset is not enough: the SDK then
        # retries aiohttp connection errors on its own once, after 1 to 10 s.
        options: dict[str, Any] = {
            "retry_options": types.HttpRetryOptions(attempts=1),
            "api_version": self.api_version(key),
        }
        if key.get("base_url"):
            options["base_url"] = key["base_url"]
        # vertexai=False: the Gemini API with this key, whatever GOOGLE_GENAI_USE_VERTEXAI says
        return genai.Client(api_key=key["api_key"], vertexai=False, http_options=types.HttpOptions(**options))

    def api_version(self, key: Key) -> str:
        """``model_config.api_version``, else the key entry's ``api_version``, else ``v1beta``."""
        for field, value in (
            ("model_config.api_version", self.model_config.get("api_version")),
            (f"key.json: {self.key_name}.api_version", key.get("api_version")),
        ):
            if value is None:
                continue
            if not isinstance(value, str) or not _API_VERSION.match(value):
                raise FailedPreconditionError(
                    f"{field} of {self.model_name} must be a Gemini API version such as 'v1beta' or 'v1',"
                    f" got {value!r}",
                    subject=field,
                )
            return value
        return API_VERSION

    async def unload(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.aio.aclose()
        await super().unload()

    def encode_messages(self, messages: Sequence[Message]) -> list[Any]:
        types = self.types
        contents = []
        for message in messages:
            if message["role"] in ("assistant", "model"):
                contents.append(types.Content(role="model", parts=[types.Part(text=message["content"])]))
            elif message["role"] == "user":
                parts = [types.Part(text=message["content"])]
                parts.extend(self._image_part(image) for image in message.get("image") or [])
                contents.append(types.Content(role="user", parts=parts))
        return contents

    def _image_part(self, image: ImagePart) -> Any:
        if image.source.startswith(("http://", "https://")):
            return self.types.Part.from_uri(file_uri=image.source, mime_type=image_mime(image))
        return self.types.Part.from_bytes(data=image.data, mime_type=image_mime(image))

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        types = self.types
        contents = self.encode_messages(messages)
        config = types.GenerateContentConfig(
            temperature=args.temperature,
            max_output_tokens=args.max_tokens,
            safety_settings=[
                types.SafetySetting(
                    category=types.HarmCategory(category), threshold=types.HarmBlockThreshold.BLOCK_MEDIUM_AND_ABOVE
                )
                for category in SAFETY_CATEGORIES
            ],
        )
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        if system:
            config.system_instruction = system
        if flag(self.model_config, "thinking_mode"):
            config.max_output_tokens = THINKING_BUDGET + args.max_tokens
            config.thinking_config = types.ThinkingConfig(thinking_budget=THINKING_BUDGET)
        return json_ready(contents), {"model": self.model_id, "contents": contents, "config": config}

    async def send(self, request: dict[str, Any]) -> Any:
        return await self.client.aio.models.generate_content(**request)

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        """The chunks put together into the ``GenerateContentResponse`` that ``generate_content`` returns:
        the first candidate's parts joined (adjacent text parts of the same kind, thought or answer, as
        one), everything else from the last chunk that says it. ``sdk_http_response`` holds the headers of
        the streamed HTTP reply."""
        chunks: list[Any] = []
        async with contextlib.aclosing(await self.client.aio.models.generate_content_stream(**request)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                for part in _parts(chunk):
                    if isinstance(part.text, str) and not part.thought:
                        piece(part.text)
        return self.joined(chunks)

    def joined(self, chunks: list[Any]) -> Any:
        if not chunks:
            raise incomplete_stream()
        final = chunks[-1].model_copy(deep=True)
        for name in type(final).model_fields:
            if getattr(final, name) is None:
                said = next((getattr(c, name) for c in reversed(chunks) if getattr(c, name) is not None), None)
                setattr(final, name, said)
        if final.automatic_function_calling_history is None:
            # generate_content records its function-calling history, empty here (no tools are sent);
            # the streaming call leaves it unset
            final.automatic_function_calling_history = []
        with_candidates = [c for c in chunks if c.candidates]
        blocked = final.prompt_feedback is not None and final.prompt_feedback.block_reason is not None
        if not with_candidates:
            if blocked:
                return final
            raise incomplete_stream()
        candidate = with_candidates[-1].candidates[0].model_copy(deep=True)
        if candidate.finish_reason is None and not blocked:
            raise incomplete_stream()
        parts: list[Any] = []
        for chunk in with_candidates:
            for part in _parts(chunk):
                last = parts[-1] if parts else None
                if (
                    last is not None
                    and _text_only(last)
                    and _text_only(part)
                    and bool(last.thought) == bool(part.thought)
                ):
                    last.text += part.text
                    last.thought_signature = part.thought_signature or last.thought_signature
                else:
                    parts.append(part.model_copy(deep=True))
        if candidate.content is None:
            candidate.content = self.types.Content(role="model")
        candidate.content.role = candidate.content.role or next(
            (c.candidates[0].content.role for c in with_candidates if c.candidates[0].content), None
        )
        candidate.content.parts = parts or None
        final.candidates = [candidate]
        return final

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        candidates = response.candidates or []
        content = candidates[0].content if candidates else None
        role = getattr(content, "role", None)
        if content is not None and role is not None and role != "model":
            raise RuntimeError(f"Google answered with role {role!r}; expected 'model'")
        return response.model_dump(mode="json"), (response.text or "").strip()

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        if isinstance(exc, self.errors.APIError):
            status = int(exc.code) if exc.code else None
            reason = _reason(exc)
            headers = getattr(getattr(exc, "response", None), "headers", None)
            retry_after = retry_after_seconds(headers)
            if retry_after is None:
                retry_after = _retry_delay(exc.details)
            if status == 400 and _error_reason(exc.details) == "API_KEY_INVALID":
                return UpstreamFailure(401, f"HTTP 400 {reason}", retry_after)
            if status == 400 and looks_like_context_error(reason):
                return UpstreamFailure(status, reason, retry_after, context_numbers(reason), context_exceeded=True)
            return UpstreamFailure(status, reason, retry_after)
        if isinstance(exc, self.transport_errors):
            return UpstreamFailure(None, f"{type(exc).__name__}: {exc}"[:300])
        if isinstance(exc, json.JSONDecodeError):
            # a reply that is not JSON: a proxy's error page or a cut-off body; the provider's fault, and
            # usually gone on the next try, so a transient 502 rather than INTERNAL
            return UpstreamFailure(502, f"a reply that is not JSON ({exc.msg})")
        return None


def _parts(chunk: Any) -> list[Any]:
    candidates = chunk.candidates or []
    content = candidates[0].content if candidates else None
    return list(getattr(content, "parts", None) or [])


def _text_only(part: Any) -> bool:
    """A part that is text and nothing else (a thought signature aside), which a following one extends."""
    fields = part.model_dump(exclude_none=True, exclude={"text", "thought", "thought_signature"})
    return isinstance(part.text, str) and not fields


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level exceptions of whichever HTTP library the SDK picks."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
        ("aiohttp", "ClientError"),
        ("google.auth.exceptions", "TransportError"),
    ):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _error(details: Any) -> dict[str, Any]:
    if isinstance(details, dict):
        inner = details.get("error", details)
        if isinstance(inner, dict):
            return inner
    return {}


def _reason(exc: Any) -> str:
    """Google's own words: ``error.status: error.message`` from the body."""
    message = exc.message if isinstance(exc.message, str) and exc.message else json.dumps(exc.details)
    status = exc.status if isinstance(exc.status, str) else ""
    return (f"{status}: {message}" if status else message)[:300]


def _entries(details: Any, kind: str) -> list[dict[str, Any]]:
    entries = _error(details).get("details")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and str(e.get("@type", "")).endswith(kind)]


def _error_reason(details: Any) -> str:
    return next((str(e.get("reason")) for e in _entries(details, "google.rpc.ErrorInfo")), "")


def _retry_delay(details: Any) -> float | None:
    """``RetryInfo.retryDelay`` ("13s"), which Gemini sends with 429 instead of a Retry-After header."""
    for entry in _entries(details, "google.rpc.RetryInfo"):
        match = _SECONDS.match(str(entry.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None
