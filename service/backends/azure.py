"""``azure``: models deployed on Azure AI Foundry, routed as clembench routes them (spec §5.4).

A model id containing "claude" goes to Anthropic's Messages API through the SDK's Foundry client (key.json
entry ``azure_claude``), anything else to OpenAI's chat completions (entry ``azure_gpt``); each entry needs
``api_key`` and ``base_url``. GPT gets temperature and max_completion_tokens (reasoning models: temperature
above 0, ``reasoning_effort`` from the registry entry, no limit); Claude gets temperature and max_tokens
(``thinking_mode``: temperature 1, ``thinking_budget`` added to max_tokens). Nothing else is sent.

Differences from clembench, on purpose:
- Only the entry of the model's own route is needed (clembench required both at start-up).
- Claude's system message goes in Anthropic's ``system`` field (the last one wins, as in clembench's
  anthropic backend; left out when empty) and its images as Anthropic base64 image blocks: clembench sent a
  "system" role and OpenAI-style ``image_url`` parts, which the Messages API rejects.
- Claude's text is the first text block's (clembench: ``content[1]`` with thinking on, else ``content[0]``);
  "" when there is none. GPT's text is ``(content or "").strip()`` (clembench crashed on None).
- Flags are read by value; the request pins ``anthropic-version: 2023-06-01`` and sends ``temperature`` in
  the body, because the 2.x SDK's default version refuses the temperature clembench sends.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any

from clemserve.registry import Key
from clemserve.registry.errors import FailedPreconditionError

from ..domain import GenArgs, ImagePart, Message, TextSink
from .anthropic import API_VERSION, classify_anthropic, parse_message, stream_message
from .openai import (
    MalformedAnswer,
    base_url,
    chat_result,
    check_reasoning_temperature,
    classify_openai,
    create_chat,
    encode_messages,
    stream_chat,
)
from .remote import (
    RemoteBackend,
    UpstreamFailure,
    flag,
    image_base64,
    image_mime,
    incomplete_stream,
    stream_error,
)

#: clembench sends this one deployment to the Responses API (by model_name)
RESPONSES_API_MODELS = frozenset({"upgpt-codex"})


class AzureBackend(RemoteBackend):
    """What the routes share; the catalog picks the route's class, AzureClaudeBackend or AzureGPTBackend."""

    name = "azure"

    def connect(self, key: Key) -> Any:
        url = base_url(key, self.key_name)
        if url is None:
            raise FailedPreconditionError(
                f"the key.json entry '{self.key_name}' has no base_url (the Azure endpoint of the deployment)",
                subject=f"key.json: {self.key_name}",
            )
        return self.client_for(key, url)

    @abc.abstractmethod
    def client_for(self, key: Key, url: str) -> Any:
        """The route's SDK client at ``url``."""


class AzureGPTBackend(AzureBackend):
    """OpenAI models on Azure, through OpenAI's own SDK at the entry's base_url."""

    key_name = "azure_gpt"
    provider = "Azure OpenAI"

    def client_for(self, key: Key, url: str) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=key["api_key"], base_url=url, max_retries=0, timeout=self.context.retry.request_timeout_s
        )

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        prompt = encode_messages(messages)
        if self.model_name in RESPONSES_API_MODELS:
            # as clembench: the messages as input, no generation arguments
            return prompt, {"model": self.model_id, "input": prompt}
        request: dict[str, Any] = {
            "model": self.model_id,
            "messages": prompt,
            "temperature": args.temperature,
            "max_completion_tokens": args.max_tokens,
        }
        if flag(self.model_config, "reasoning_model"):
            if "reasoning_effort" in self.model_config:
                request["reasoning_effort"] = self.model_config["reasoning_effort"]
            check_reasoning_temperature(args.temperature)
            del request["max_completion_tokens"]  # as clembench: no output limit for reasoning models
        return prompt, request

    async def send(self, request: dict[str, Any]) -> Any:
        if "input" not in request:
            return await create_chat(self.client, request)
        try:
            response = await self.client.responses.create(**request)
        except json.JSONDecodeError as exc:
            raise MalformedAnswer(f"the answer is not valid JSON ({exc})") from None
        if getattr(response, "output", None) is None:
            raise MalformedAnswer("the answer is not a Responses API response")
        return response

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        if "input" not in request:
            return await stream_chat(self.client, request, piece)
        # the Responses API streams typed events; its last one carries the whole Response, as send's
        try:
            stream = await self.client.responses.create(**request, stream=True)
            async with stream:
                async for event in stream:
                    kind = getattr(event, "type", "")
                    if kind == "response.output_text.delta":
                        piece(event.delta)
                    elif kind in ("response.completed", "response.incomplete"):
                        return event.response
                    elif kind == "response.failed":
                        error = event.response.error
                        raise stream_error(getattr(error, "code", None), getattr(error, "message", "failed"))
                    elif kind == "error":
                        raise stream_error(getattr(event, "code", None), event.message)
        except json.JSONDecodeError as exc:
            raise MalformedAnswer(f"a streamed event is not valid JSON ({exc})") from None
        raise incomplete_stream()

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        if not hasattr(response, "choices"):  # the Responses API
            return response.model_dump(mode="json"), (response.output_text or "").strip()
        return chat_result(response)

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        return classify_openai(exc)


class AzureClaudeBackend(AzureBackend):
    """Claude on Azure AI Foundry, through Anthropic's SDK (its Foundry client)."""

    key_name = "azure_claude"
    provider = "Azure Claude"

    def client_for(self, key: Key, url: str) -> Any:
        import anthropic

        return anthropic.AsyncAnthropicFoundry(
            api_key=key["api_key"],
            base_url=url,
            max_retries=0,
            timeout=self.context.retry.request_timeout_s,
            default_headers={"anthropic-version": API_VERSION},
        )

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        system, prompt = encode_claude_messages(messages)
        temperature, max_tokens = args.temperature, args.max_tokens
        request: dict[str, Any] = {"model": self.model_id, "messages": prompt}
        if system:
            request["system"] = system
        if flag(self.model_config, "thinking_mode"):
            budget = self.model_config.get("thinking_budget")
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise FailedPreconditionError(
                    f"registry entry {self.model_name} enables thinking_mode but has no thinking_budget "
                    "(a positive number of tokens) in its model_config",
                    subject="model_config.thinking_budget",
                )
            temperature, max_tokens = 1.0, budget + args.max_tokens
            request["thinking"] = {"type": "enabled", "budget_tokens": budget}
        request["max_tokens"] = max_tokens
        request["extra_body"] = {"temperature": temperature}  # the 2.x SDK has no temperature argument
        return prompt, request

    async def send(self, request: dict[str, Any]) -> Any:
        try:
            response = await self.client.messages.create(**request)
        except json.JSONDecodeError as exc:
            raise MalformedAnswer(f"the answer is not valid JSON ({exc})") from None
        if getattr(response, "content", None) is None:
            raise MalformedAnswer("the answer is not an Anthropic message")
        return response

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        try:
            return await stream_message(self.client, request, piece)
        except json.JSONDecodeError as exc:
            raise MalformedAnswer(f"a streamed event is not valid JSON ({exc})") from None

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        return parse_message(response)

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        import anthropic

        if isinstance(exc, MalformedAnswer):
            return UpstreamFailure(None, str(exc))
        return classify_anthropic(anthropic, exc)


def encode_claude_messages(messages: Sequence[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system text, messages) in Anthropic's format: the last system message is the system text (as
    clembench's anthropic backend); a message with images gets a text block and base64 image blocks."""
    system = ""
    encoded: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
            continue
        images = message.get("image")
        if not images:
            encoded.append({"role": message["role"], "content": message["content"]})
            continue
        blocks: list[dict[str, Any]] = [{"type": "text", "text": message["content"].replace(" <image> ", " ")}]
        blocks += [_image_block(image) for image in images]
        encoded.append({"role": message["role"], "content": blocks})
    return system, encoded


def _image_block(image: ImagePart) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": image_mime(image), "data": image_base64(image)}}
