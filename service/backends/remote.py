"""What every remote backend shares: keys, retries, error mapping, images, redaction.

A provider module subclasses :class:`RemoteBackend` and supplies five things: the client (``connect``),
the request (``build_request``), the call (``send``), the streamed call (``send_stream``) and the result
(``parse``), plus ``classify``, which turns its SDK's exceptions into an :class:`UpstreamFailure`.
Everything else lives here, once.

Retries: transient failures (HTTP 408, 429, 500, 502, 503, 504, connection errors, timeouts) are retried
with exponential backoff and full jitter, honouring ``Retry-After``, and never past the caller's gRPC
deadline. Deterministic failures come back at once. The SDKs' own retries are switched off so there is
one policy, this one. Under a rate limiter (``--rate-limit``, rate_limits.py) each try first waits for the
limiter's permit, and a 429 sends the call back to its queue instead of using up a try.

Streaming: a streamed request (one with a text sink) is sent with the SDK's streaming call
(``send_stream``); each piece of the reply's text goes to the sink as the provider sends it, and the
provider module rebuilds from the stream the response ``send`` would have returned, so that ``parse``,
the response object, the text and the usage are Generate's. A stream that has sent text is never
retried: a failure after it ends the call with the status the failure maps to.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from clemserve.registry import Key
from clemserve.registry.errors import (
    ClemserveError,
    ContextExceededError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

from ..domain import FinishReason, GenArgs, Generation, ImagePart, Message, TextSink, TokenCount
from ..logs import deadline_var
from .base import Backend, Progress, RetryPolicy, missing_dependency
from .rate_limits import TokenCharge, estimate_tokens

log = logging.getLogger(__name__)

#: 529 is Anthropic's "overloaded"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass
class UpstreamFailure(Exception):
    """A provider's failure in provider-neutral terms (``status`` None: no HTTP answer at all)."""

    status: int | None
    reason: str
    retry_after_s: float | None = None
    #: the provider said the prompt does not fit; numbers where it gave them
    context: tuple[int, int] | None = None
    context_exceeded: bool = False

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in TRANSIENT_STATUSES


def retry_after_seconds(headers: Any) -> float | None:
    """``Retry-After`` (seconds or HTTP date) or ``retry-after-ms``, from any header mapping."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return float(ms) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_CONTEXT_PATTERNS = (
    # OpenAI and compatible servers: "maximum context length is 4097 tokens. However, you requested 5000 tokens"
    re.compile(r"maximum context length is (\d+) tokens.*?(?:requested|resulted in) (\d+) tokens", re.S),
    # vLLM: "This model's maximum context length is 512 tokens. However, your prompt contains 600 input tokens"
    re.compile(r"maximum context length is (\d+) tokens.*?(?:has|contains) (?:at least )?(\d+) input tokens", re.S),
    # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
    re.compile(r"(?P<used>\d+) tokens > (?P<size>\d+) maximum"),
    # Anthropic, prompt plus max_tokens: "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000"
    re.compile(r"exceed context limit: (?P<a>\d+) \+ (?P<b>\d+) > (?P<size>\d+)"),
    # Google: "input token count (1048577) exceeds the maximum number of tokens allowed (1048576)"
    re.compile(r"input token count \(?(?P<used>\d+)\)? exceeds the maximum[^\d]*(?P<size>\d+)"),
    # Mistral: "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length"
    re.compile(
        r"[Pp]rompt contains (?P<used>\d+) tokens.*?too large for model with (?P<size>\d+) maximum context", re.S
    ),
)
_CONTEXT_WORDS = re.compile(
    r"context[ _-]length|context window|maximum context|too many tokens|prompt is too long|"
    r"exceeds the maximum number of tokens|context_length_exceeded",
    re.I,
)


def context_numbers(text: str) -> tuple[int, int] | None:
    """(tokens_used, context_size) from a provider's context-length message, when it names them."""
    for pattern in _CONTEXT_PATTERNS:
        match = pattern.search(text)
        if match:
            groups = match.groupdict()
            if "a" in groups:
                return int(groups["a"]) + int(groups["b"]), int(groups["size"])
            if groups:
                return int(groups["used"]), int(groups["size"])
            size, used = int(match.group(1)), int(match.group(2))
            return used, size
    return None


def looks_like_context_error(text: str) -> bool:
    return bool(_CONTEXT_WORDS.search(text))


# -- images --------------------------------------------------------------------------------------------


def image_mime(image: ImagePart) -> str:
    return image.mime_type or "image/png"


def image_base64(image: ImagePart) -> str:
    return base64.b64encode(image.data).decode("ascii")


def image_data_url(image: ImagePart) -> str:
    return f"data:{image_mime(image)};base64,{image_base64(image)}"


def check_images(messages: Sequence[Message], model_config: dict[str, Any], model_name: str) -> None:
    """Images only for models whose entry enables ``multimodality``, several only with ``multiple_images``.

    Flags are read by value: ``"multimodality": false`` means no images (clembench: the key's presence).
    """
    multimodality = model_config.get("multimodality")
    for i, message in enumerate(messages):
        images = message.get("image") or []
        if not images:
            continue
        if not multimodality:
            raise InvalidArgumentError(
                f"messages[{i}].image",
                f"{model_name} does not accept images (its registry entry does not enable multimodality)",
            )
        if len(images) > 1 and not (isinstance(multimodality, dict) and multimodality.get("multiple_images")):
            raise InvalidArgumentError(
                f"messages[{i}].image", f"{model_name} accepts one image per message, got {len(images)}"
            )


def flag(model_config: dict[str, Any], name: str) -> bool:
    """A registry flag, read by value (clembench reads these by presence)."""
    return bool(model_config.get(name))


# -- the base class ------------------------------------------------------------------------------------


class RemoteBackend(Backend):
    """A model behind a provider's HTTP API, called through the provider's asynchronous SDK."""

    #: the key.json entry this backend reads (clembench's names)
    key_name: ClassVar[str]
    #: the provider's name in messages ("OpenAI", "Anthropic", ...)
    provider: ClassVar[str]
    #: the pip extra that installs the SDK
    extra: ClassVar[str] = "remote"

    async def load(self, progress: Progress) -> None:
        if "model_id" not in self.spec:
            raise FailedPreconditionError(
                f"registry entry {self.model_name} has no model_id (the provider's name for the model)",
                subject="model_id",
            )
        self.model_id = str(self.spec["model_id"])
        self.key = self.read_key()
        try:
            self.client = self.connect(self.key)
        except ImportError as exc:
            raise missing_dependency(self.name, self.extra, exc) from None
        progress(f"{self.provider} client ready for {self.model_id}")

    def read_key(self) -> Key:
        key = self.context.keys.get_key_for(self.key_name)
        if not key.has_api_key():
            raise FailedPreconditionError(
                f"the key.json entry '{self.key_name}' has no api_key; add one (or set its environment variable)",
                subject=f"key.json: {self.key_name}",
            )
        return key

    async def unload(self) -> None:
        """Close the SDK client's connections, whichever way this SDK offers."""
        client = getattr(self, "client", None)
        for name in ("close", "aclose", "__aexit__"):
            close = getattr(client, name, None)
            if close is None:
                continue
            try:
                result = close(None, None, None) if name == "__aexit__" else close()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.debug("closing the %s client failed", self.provider, exc_info=True)
            return

    # -- what each provider supplies --------------------------------------------------------------

    @abc.abstractmethod
    def connect(self, key: Key) -> Any:
        """The SDK's async client (imports the SDK; ImportError means the extra is missing)."""

    @abc.abstractmethod
    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        """(the prompt object clembench returns, the keyword arguments of the SDK call)."""

    @abc.abstractmethod
    async def send(self, request: dict[str, Any]) -> Any:
        """One SDK call."""

    @abc.abstractmethod
    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        """One streamed SDK call: each piece of the reply's text, before any cleaning, goes to ``piece`` as
        it arrives; returns the response ``send`` returns for the same request (the same SDK type, rebuilt
        from the stream). A stream that ends before the provider said the reply is complete raises an
        :class:`UpstreamFailure` (no status: a broken connection)."""

    @abc.abstractmethod
    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        """(the response object as a JSON-ready dict, the response text), as clembench builds them."""

    @abc.abstractmethod
    def classify(self, exc: Exception) -> UpstreamFailure | None:
        """The SDK's exception as an UpstreamFailure; None for errors that are not the provider's."""

    # -- shared -----------------------------------------------------------------------------------

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        """The provider's reply; with a ``sink`` (a streamed request), streamed as the provider sends it."""
        check_images(messages, self.model_config, self.model_name)
        prompt, request = self.build_request(messages, args)
        charge = TokenCharge(estimate_tokens(sum(len(str(m.get("content", ""))) for m in messages), args.max_tokens))
        if sink is None:
            response = await self.call(lambda: self.send(request), charge=charge)
        else:
            response = await self.call_streaming(request, sink, charge)
        response_object, text = self.parse(response)
        tokens = usage_of(response_object)
        if tokens.prompt or tokens.completion:
            charge.settle(tokens.prompt + tokens.completion)
        return Generation(
            prompt=prompt,
            response=response_object,
            text=text,
            prompt_tokens=tokens.prompt,
            completion_tokens=tokens.completion,
            finish_reason=finish_reason(response_object),
            cached_prompt_tokens=tokens.cached_prompt,
            reasoning_tokens=tokens.reasoning,
            cache_write_tokens=tokens.cache_write,
        )

    def text_chat_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        """For providers clembench sends only text, temperature and max_tokens (Mistral, Cohere): the
        prompt object is the message list as sent; images and other generation arguments are refused."""
        for i, message in enumerate(messages):
            if message.get("image"):
                raise InvalidArgumentError(
                    f"messages[{i}].image",
                    f"backend {self.name} sends text only; {self.model_name} cannot take images "
                    "(whatever its registry entry says about multimodality)",
                )
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
        request = {
            "model": self.model_id,
            "messages": prompt,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
        }
        return prompt, request

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        raise FailedPreconditionError(
            f"{self.provider} models count tokens on the provider's side; CountTokens serves local models",
            subject=f"backend {self.name}",
        )

    async def call_streaming(self, request: dict[str, Any], sink: TextSink, charge: TokenCharge | None = None) -> Any:
        """``send_stream`` under the retry policy until its first piece of text; never retried after it."""
        sent = False

        def piece(text: str) -> None:
            nonlocal sent
            if text:
                sent = True
                sink(text)

        return await self.call(lambda: self.send_stream(request, piece), committed=lambda: sent, charge=charge)

    async def call(
        self,
        attempt: Callable[[], Awaitable[Any]],
        committed: Callable[[], bool] | None = None,
        charge: TokenCharge | None = None,
    ) -> Any:
        """Run ``attempt`` under the retry policy, the key's rate limiter and the caller's deadline. Once
        ``committed()`` says the attempt has delivered something to the caller (streamed text), a failure is
        not retried. Under a rate limiter (``--rate-limit``, service/backends/rate_limits.py) each try waits
        for a permit, and a 429 sends the call back to the limiter's queue without using up a try, for as long
        as the caller's deadline (without one: ``--remote-timeout`` from the first try) leaves time."""
        policy: RetryPolicy = self.context.retry
        deadline = deadline_var.get()
        limiter = self.context.rate_limits.limiter(self.key_name, self.name)
        hold_until = deadline if deadline is not None else time.monotonic() + policy.request_timeout_s
        failure: UpstreamFailure | None = None
        made = retries = held = 0
        while True:
            permit = None if limiter is None else await limiter.acquire(charge or TokenCharge(0), deadline)
            with permit or contextlib.nullcontext():
                timeout = policy.request_timeout_s
                cut_by_deadline = deadline is not None and deadline - time.monotonic() < timeout
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - time.monotonic()))
                made += 1
                try:
                    response = await asyncio.wait_for(attempt(), timeout=timeout)
                except TimeoutError:
                    if cut_by_deadline:
                        said = "was still streaming its reply" if committed and committed() else "had not answered"
                        raise DeadlineExceededError(
                            f"the caller's deadline passed while {self.provider} {said} "
                            f"(try {made} of {policy.attempts})"
                        ) from None
                    failure = UpstreamFailure(None, f"no answer within {timeout:.1f} s")
                except UpstreamFailure as exc:  # raised by send_stream for what its stream said
                    failure = exc
                except Exception as exc:
                    classified = self.classify(exc) or transport_failure(exc)
                    if classified is None:
                        raise
                    failure = classified
                else:
                    if permit is not None:
                        permit.succeeded()
                    return response
                limited = permit is not None and failure.status == 429 and not (committed and committed())
                delay = policy.delay(held if limited else retries, failure.retry_after_s)
                if permit is not None and limited:
                    permit.rate_limited(delay)  # the whole key waits, and its concurrency is lowered
            if committed is not None and committed():
                raise self.broken_off(failure)
            if not failure.transient or failure.context_exceeded:
                raise self.error_for(failure)
            if limited and time.monotonic() + delay < hold_until:
                held += 1
                log.debug("%s answered 429; the call waits in the rate limiter's queue again", self.provider)
                continue
            retries += 1
            if retries == policy.attempts:
                break
            if deadline is not None and time.monotonic() + delay >= deadline:
                log.info(
                    "%s: %s; no retry, the caller's deadline is nearer than %.2f s",
                    self.provider,
                    failure.reason,
                    delay,
                )
                break
            log.warning(
                "%s answered %s: %s; retry %d of %d in %.2f s",
                self.provider,
                failure.status or "nothing",
                failure.reason,
                retries,
                policy.attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
        assert failure is not None
        raise self.exhausted(failure, made)

    def error_for(self, failure: UpstreamFailure) -> ClemserveError:
        """The error for a failure that retrying would not fix."""
        status = failure.status
        said = f"{self.provider} answered HTTP {status}: {failure.reason}"
        if failure.context_exceeded:
            used, size = failure.context or (0, 0)
            err: ClemserveError = ContextExceededError(
                f"Context token limit for {self.model_name} exceeded ({self.provider}: {failure.reason})",
                used,
                size - used,
                size,
            )
        elif status in (401, 403):
            err = FailedPreconditionError(
                f"{self.provider} refused the API key of key.json entry '{self.key_name}' (HTTP {status}): "
                f"{failure.reason}",
                subject=f"key.json: {self.key_name}",
            )
        elif status == 404:
            err = ModelNotFoundError(f"{said} (model_id {self.model_id})", selector=self.model_name)
        else:
            err = InvalidArgumentError("request", said)
        err.metadata.update(upstream_status=str(status), provider=self.provider)
        return err

    def exhausted(self, failure: UpstreamFailure, attempts: int) -> ClemserveError:
        said = f"HTTP {failure.status}" if failure.status else "no answer"
        return self.transient_error(failure, f"{self.provider} failed {attempts} time(s), last with {said}: ")

    def broken_off(self, failure: UpstreamFailure) -> ClemserveError:
        """The error for a failure after a stream sent text: mapped as for Generate, never retried."""
        if not failure.transient or failure.context_exceeded:
            return self.error_for(failure)
        said = f"HTTP {failure.status}" if failure.status else "a broken stream"
        return self.transient_error(
            failure, f"{self.provider} broke off its streamed reply after text was sent (not retried), with {said}: "
        )

    def transient_error(self, failure: UpstreamFailure, prefix: str) -> ClemserveError:
        message = prefix + failure.reason
        metadata = {"upstream_status": str(failure.status or 0), "provider": self.provider}
        retry_after = failure.retry_after_s or 0.0
        if failure.status == 429:
            return ResourceExhaustedError(message, retry_after_s=retry_after, metadata=metadata)
        return UnavailableError(message, metadata=metadata, retry_after_s=retry_after)


_LENGTH_REASONS = {"length", "max_tokens", "MAX_TOKENS"}
_STOP_REASONS = {"stop", "end_turn", "stop_sequence", "STOP", "COMPLETE", "STOP_SEQUENCE"}


def finish_reason(response: dict[str, Any]) -> FinishReason:
    """Why the provider stopped, from where each provider says it (OpenAI, Mistral, Anthropic, Gemini, Cohere)."""
    candidates = response.get("choices") or response.get("candidates") or [{}]
    first = candidates[0] if isinstance(candidates, list) and candidates else {}
    said = response.get("stop_reason") or response.get("finish_reason") or (first or {}).get("finish_reason")
    if said in _LENGTH_REASONS:
        return FinishReason.LENGTH
    if said in _STOP_REASONS:
        return FinishReason.STOP
    return FinishReason.UNSPECIFIED


class Tokens(NamedTuple):
    """A reply's token counts: the whole prompt (cached tokens included) and the whole completion (reasoning
    included), with the parts of each that the provider reports (``cache_write``: prompt tokens written to the
    provider's prompt cache, which Anthropic bills above its input price)."""

    prompt: int = 0
    completion: int = 0
    cached_prompt: int = 0
    reasoning: int = 0
    cache_write: int = 0


def usage_of(response: dict[str, Any]) -> Tokens:
    """The token counts in a provider's response object, from each provider's own shape."""
    if isinstance(response.get("usage_metadata"), dict):  # Google: thoughts are billed as output, apart
        meta = response["usage_metadata"]
        thoughts = _count(meta, "thoughts_token_count")
        completion = _count(meta, "candidates_token_count") + thoughts
        return Tokens(
            _count(meta, "prompt_token_count"), completion, _count(meta, "cached_content_token_count"), thoughts
        )
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return Tokens()
    if isinstance(usage.get("tokens"), dict):  # Cohere v2: tokens, billed_units, cached_tokens
        tokens = usage["tokens"]
        return Tokens(_count(tokens, "input_tokens"), _count(tokens, "output_tokens"), _count(usage, "cached_tokens"))
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        # Anthropic: input_tokens leaves out the tokens read from and written to its prompt cache
        cached, written = _count(usage, "cache_read_input_tokens"), _count(usage, "cache_creation_input_tokens")
        prompt = _count(usage, "input_tokens") + cached + written
        return Tokens(prompt, _count(usage, "output_tokens"), cached, cache_write=written)
    if "prompt_tokens" in usage:  # OpenAI's chat completions (Azure, OpenRouter, Mistral and compatible servers)
        return Tokens(
            _count(usage, "prompt_tokens"),
            _count(usage, "completion_tokens"),
            _count(usage.get("prompt_tokens_details"), "cached_tokens"),
            _count(usage.get("completion_tokens_details"), "reasoning_tokens"),
        )
    # OpenAI's Responses API, and Anthropic without a prompt cache
    return Tokens(
        _count(usage, "input_tokens"),
        _count(usage, "output_tokens"),
        _count(usage.get("input_tokens_details"), "cached_tokens"),
        _count(usage.get("output_tokens_details"), "reasoning_tokens"),
    )


def _count(part: Any, key: str) -> int:
    """``part[key]`` as a count; 0 where the part or the key is missing or null."""
    value = part.get(key) if isinstance(part, dict) else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def transport_failure(exc: Exception) -> UpstreamFailure | None:
    """A connection that broke (an HTTP library's transport error or timeout, which some SDKs let through
    unwrapped while a streamed body is read) as a failure with no answer; None for anything else."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"TransportError", "TimeoutException", "ClientPayloadError", "ClientConnectionError"}:
        return UpstreamFailure(None, f"{type(exc).__name__}: {exc}"[:300])
    return None


#: the HTTP status each provider's error type stands for, for errors sent inside a stream (whose HTTP
#: status is the 200 the stream began with): OpenAI's and Anthropic's names, with Mistral's and Cohere's
STREAM_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "api_error": 500,
    "server_error": 500,
    "internal_error": 500,
    "service_unavailable": 503,
    "overloaded_error": 503,
}


def stream_error(kind: Any, message: Any, code: Any = None) -> UpstreamFailure:
    """An error a provider sent inside a stream: its HTTP status from a numeric ``code``, else from its type
    (unknown types: no status, a broken stream, transient)."""
    status: int | None = None
    if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
        status = int(code)
    elif isinstance(kind, str):
        status = STREAM_ERROR_STATUS.get(kind)
    reason = f"{kind}: {message}" if kind else str(message)
    return UpstreamFailure(status, reason[:300])


def incomplete_stream() -> UpstreamFailure:
    return UpstreamFailure(None, "the stream ended before the provider said the reply was complete")


def json_ready(value: Any) -> Any:
    """A value the prompt or response object can carry through JSON (SDK objects dumped, bytes skipped)."""
    return json.loads(json.dumps(value, default=_dump))


def _dump(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_none=True)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return repr(value)
