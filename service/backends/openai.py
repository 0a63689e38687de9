"""OpenAI's chat completions API and the servers that speak it: ``openai``, ``openai_compatible``, ``openrouter``.

As clembench's ``openai_api.py``, ``openai_compatible_api.py`` and ``openrouter_api.py`` (spec §5.3), except:
flags are read by value, TLS verification stays on (clembench turned it off for openai_compatible and
openrouter), and only transient failures are retried. The helpers below serve the Azure GPT route too.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any, ClassVar

from clemserve.registry import Key
from clemserve.registry.errors import FailedPreconditionError, InvalidArgumentError

from ..domain import GenArgs, ImagePart, Message, TextSink
from .base import Backend
from .remote import (
    RemoteBackend,
    UpstreamFailure,
    context_numbers,
    flag,
    image_data_url,
    incomplete_stream,
    looks_like_context_error,
    retry_after_seconds,
    stream_error,
)

OPENAI_URL = "https://api.openai.com/v1"
OPENROUTER_URL = "https://openrouter.ai/api/v1"
#: clembench's OpenRouter default when the registry entry names no extra_body
OPENROUTER_EXTRA_BODY: dict[str, Any] = {"provider": {"quantizations": ["fp8"]}}
#: keyword arguments of the SDK call that a generation argument must not replace
SDK_OPTIONS = frozenset(
    {"model", "messages", "stream", "stream_options", "extra_body", "extra_headers", "extra_query", "timeout"}
)
REASON_CHARS = 300
_VLLM_OUTPUT_OVER_CONTEXT = re.compile(r"\w+=(\d+) cannot be greater than max_model_len=(\d+)")


class MalformedAnswer(Exception):
    """The provider answered 200 with something that is not a chat completion."""


# -- shared with the Azure GPT route ---------------------------------------------------------------


def base_url(key: Key, key_name: str, default: str | None = None) -> str | None:
    """The key entry's ``base_url`` (else ``default``): https, or plain http to this machine only.

    A key sent over plain http to another machine can be read on the way, so that is refused.
    """
    url = key.get("base_url") or default
    if url is None:
        return None
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname or "")):
        return str(url)
    raise FailedPreconditionError(
        f"the key.json entry '{key_name}' has base_url {parts.scheme}://{parts.hostname}/...: "
        "use https, or plain http to this machine (localhost) only, so the API key is not sent in clear text",
        subject=f"key.json: {key_name}",
    )


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_url(image: ImagePart) -> str:
    """An http(s) image goes by its URL, as clembench sends it; anything else as a data URL of its bytes."""
    if image.source.startswith(("http://", "https://")):
        return image.source
    return image_data_url(image)


def encode_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """clembench's OpenAI encoding: messages without images unchanged (extra keys included); a message
    with images becomes ``{"role", "content": [text part, image_url parts...]}``."""
    encoded: list[dict[str, Any]] = []
    for message in messages:
        images = message.get("image")
        if not images:
            encoded.append(dict(message))
            continue
        parts: list[dict[str, Any]] = [{"type": "text", "text": message["content"].replace(" <image> ", " ")}]
        parts += [{"type": "image_url", "image_url": {"url": image_url(image)}} for image in images]
        encoded.append({"role": message["role"], "content": parts})
    return encoded


def check_reasoning_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise InvalidArgumentError(
            "args.temperature",
            f"For reasoning models temperature must be >0, but is {temperature}. "
            "Please use the -t option to set a temperature and try again.",
        )


async def create_chat(client: Any, request: dict[str, Any]) -> Any:
    """One chat completion; an answer that is not one raises MalformedAnswer (retried as transient)."""
    try:
        response = await client.chat.completions.create(**request)
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(f"the answer is not valid JSON ({exc})") from None
    if not getattr(response, "choices", None):
        raise MalformedAnswer("the answer holds no chat completion choices")
    return response


async def stream_chat(client: Any, request: dict[str, Any], piece: TextSink) -> Any:
    """One streamed chat completion: the first choice's text to ``piece`` as it arrives; returns the
    ``ChatCompletion`` that ``create_chat`` returns for the same request, rebuilt from the chunks (usage
    included: the request asks for it with ``stream_options``)."""
    from openai.types.chat import ChatCompletion

    built = ChatCompletionBuilder()
    try:
        stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
        async with stream:
            async for chunk in stream:
                piece(built.add(chunk))
    except json.JSONDecodeError as exc:
        raise MalformedAnswer(f"a streamed chunk is not valid JSON ({exc})") from None
    return ChatCompletion.model_validate(built.completion())


class ChatCompletionBuilder:
    """A chat completion put together from its stream of chunks, as the API would have sent it whole:
    each choice's deltas concatenated (string fields, providers' own ones such as ``reasoning_content``
    included), lists extended, the finish reason and usage from the chunks that carry them."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None

    def add(self, chunk: Any) -> str:
        """Take one chunk; returns the text it adds to the first choice."""
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            value = getattr(chunk, name, None)
            if value is not None:
                self.head[name] = value
        if chunk.usage is not None:
            self.usage = chunk.usage.model_dump(mode="json")
        added = ""
        for choice in chunk.choices or []:
            into = self.choices.setdefault(
                choice.index, {"index": choice.index, "message": {"role": "assistant"}, "finish_reason": None}
            )
            if choice.finish_reason is not None:
                into["finish_reason"] = choice.finish_reason
            if choice.logprobs is not None:
                logprobs = into.setdefault("logprobs", {})
                for name, value in choice.logprobs.model_dump(mode="json").items():
                    _merge(logprobs, name, value)
            delta = choice.delta.model_dump(mode="json", exclude_none=True) if choice.delta is not None else {}
            for name, value in delta.items():
                if name == "tool_calls":
                    _merge_tool_calls(into["message"], value)
                elif name == "role":
                    into["message"]["role"] = value
                else:
                    _merge(into["message"], name, value)
            if choice.index == 0:
                added += delta.get("content") or ""
        return added

    def completion(self) -> dict[str, Any]:
        if not self.choices:
            raise MalformedAnswer("the streamed answer holds no chat completion choices")
        if any(choice["finish_reason"] is None for choice in self.choices.values()):
            raise incomplete_stream()
        for choice in self.choices.values():
            choice["message"].setdefault("content", None)
        return {
            **self.head,
            "object": "chat.completion",
            "choices": [self.choices[i] for i in sorted(self.choices)],
            "usage": self.usage,
        }


def _merge(into: dict[str, Any], name: str, value: Any) -> None:
    """Strings concatenate, lists extend, anything else is replaced."""
    held = into.get(name)
    if isinstance(held, str) and isinstance(value, str):
        into[name] = held + value
    elif isinstance(held, list) and isinstance(value, list):
        held.extend(value)
    else:
        into[name] = value


def _merge_tool_calls(message: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
    calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
    for delta in deltas:
        index = delta.pop("index", len(calls))
        while len(calls) <= index:
            calls.append({"function": {"name": "", "arguments": ""}})
        call = calls[index]
        for name, value in delta.items():
            if name == "function":
                for key, part in value.items():
                    _merge(call["function"], key, part)
            else:
                call[name] = value


def chat_result(response: Any) -> tuple[dict[str, Any], str]:
    """(``model_dump(mode="json")``, the first choice's text stripped; "" when the content is None)."""
    message = response.choices[0].message
    if message.role != "assistant":
        raise RuntimeError(f"Response message role is {message.role} but should be 'assistant'")
    return response.model_dump(mode="json"), (message.content or "").strip()


def classify_openai(exc: Exception) -> UpstreamFailure | None:
    """The OpenAI SDK's exceptions (and MalformedAnswer) as provider-neutral failures."""
    import openai

    if isinstance(exc, MalformedAnswer):
        return UpstreamFailure(None, str(exc))
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        said = body.get("message") if isinstance(body, dict) else body
        text = str(said or (json.dumps(body) if body else exc.message))
        code = body.get("code") if isinstance(body, dict) else None
        context = _output_over_context(text) or context_numbers(text)
        exceeded = exc.status_code == 400 and (
            code == "context_length_exceeded" or context is not None or looks_like_context_error(text)
        )
        return UpstreamFailure(
            exc.status_code,
            text[:REASON_CHARS],
            retry_after_s=retry_after_seconds(exc.response.headers),
            context=context,
            context_exceeded=exceeded,
        )
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        return UpstreamFailure(None, f"{exc.message}{cause}")
    if isinstance(exc, openai.APIError):  # an error sent inside a stream (OpenRouter, vLLM, ...)
        body = exc.body if isinstance(exc.body, dict) else {}
        return stream_error(body.get("type"), exc.message, body.get("code"))
    return None


def _output_over_context(text: str) -> tuple[int, int] | None:
    """vLLM's "max_tokens=600 cannot be greater than max_model_len=512": (at least max_tokens, the context)."""
    match = _VLLM_OUTPUT_OVER_CONTEXT.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


# -- the backends ----------------------------------------------------------------------------------


class OpenAIBackend(RemoteBackend):
    """``openai``: every generation argument goes to the API, extras included, as in clembench."""

    name = "openai"
    key_name = "openai"
    provider = "OpenAI"
    default_url: ClassVar[str | None] = OPENAI_URL

    def connect(self, key: Key) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=key["api_key"],
            # clembench reads the British spelling of key.json.template; KeyRegistry writes the US one
            organization=key.get("organisation") or key.get("organization"),
            base_url=base_url(key, self.key_name, self.default_url),
            max_retries=0,
            timeout=self.context.retry.request_timeout_s,
        )

    def check_args(self, args: GenArgs) -> None:
        """Every generation argument goes to the API, as in clembench: none is refused before the request is
        queued (one that clashes with the SDK's own options is refused when the request is built)."""

    def gen_kwargs(self, args: GenArgs) -> dict[str, Any]:
        clash = sorted(SDK_OPTIONS & args.extra.keys())
        if clash:
            raise InvalidArgumentError(
                f"args.{clash[0]}", f"is set by the {self.name} backend, not a generation argument"
            )
        return {"temperature": args.temperature, "max_tokens": args.max_tokens, **args.extra}

    def extra_body(self) -> Any:
        return self.model_config["extra_body"] if flag(self.model_config, "extra_body") else None

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        prompt = encode_messages(messages)
        request: dict[str, Any] = {"model": self.model_id, "messages": prompt, **self.gen_kwargs(args)}
        if flag(self.model_config, "reasoning_model"):
            check_reasoning_temperature(args.temperature)
            # as clembench: no output limit at all for reasoning models (it sends no max_completion_tokens);
            # a caller who wants one passes max_completion_tokens as an extra generation argument
            del request["max_tokens"]
        extra_body = self.extra_body()
        if extra_body is not None:
            if not isinstance(extra_body, dict):
                raise FailedPreconditionError(
                    f"registry entry {self.model_name}: model_config.extra_body must be a JSON object",
                    subject="model_config.extra_body",
                )
            request["extra_body"] = extra_body
        return prompt, request

    async def send(self, request: dict[str, Any]) -> Any:
        return await create_chat(self.client, request)

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        return await stream_chat(self.client, request, piece)

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        return chat_result(response)

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        return classify_openai(exc)


class OpenAICompatibleBackend(OpenAIBackend):
    """``openai_compatible``: any server with OpenAI's API (vLLM, llama.cpp server, ...) at the key's base_url."""

    name = "openai_compatible"
    key_name = "openai_compatible"
    provider = "OpenAI-compatible server"
    default_url = None

    def connect(self, key: Key) -> Any:
        if not key.get("base_url"):
            raise FailedPreconditionError(
                f"the key.json entry '{self.key_name}' has no base_url (the server's OpenAI API root, "
                "e.g. http://localhost:8000/v1)",
                subject=f"key.json: {self.key_name}",
            )
        return super().connect(key)


class OpenRouterBackend(OpenAIBackend):
    """``openrouter``: only temperature and max_tokens are sent; fp8 providers unless extra_body says otherwise."""

    name = "openrouter"
    key_name = "openrouter"
    provider = "OpenRouter"
    default_url = OPENROUTER_URL

    def check_args(self, args: GenArgs) -> None:
        """Only temperature and max_tokens are sent: any other generation argument is refused."""
        Backend.check_args(self, args)

    def gen_kwargs(self, args: GenArgs) -> dict[str, Any]:
        return {"temperature": args.temperature, "max_tokens": args.max_tokens}

    def extra_body(self) -> Any:
        return super().extra_body() or OPENROUTER_EXTRA_BODY
