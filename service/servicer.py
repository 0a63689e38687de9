"""The ModelService RPCs: proto in, one ModelCache call, proto out.

Every RPC is wrapped by :func:`rpc` or :func:`stream_rpc`, which serve it through :class:`_Served`: the
request id, the deadline, the size check, the metrics, and one well-formed status for any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

from . import convert
from .draining import current as current_drain
from .labels import RequestLabels
from .logs import deadline_var, request_id_var
from .metrics import MetricsSink, NoMetrics
from .model_cache import ModelCache
from .model_header import check_model_header
from .security.redaction import Redactor
from .status import as_clemserve_error, to_grpc_status
from .validation import Limits, validate_request_id, validate_request_size

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]
StreamHandler = Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]
#: set on every handler that :func:`rpc` or :func:`stream_rpc` wraps
SERVED = "__clemserve_served__"


#: the metadata of the call being served, read once per call: grpc builds the tuple anew on every
#: ``invocation_metadata()`` (about 5 µs CPU in a serving process), and a call reads it twice
_call_metadata: contextvars.ContextVar[tuple[tuple[str, Any], ...] | None] = contextvars.ContextVar(
    "clemserve_call_metadata", default=None
)


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The call's metadata: as :class:`_Served` read it for this call, else from ``context``."""
    metadata = _call_metadata.get()
    return metadata if metadata is not None else tuple(context.invocation_metadata() or ())


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    """The last value of ``key`` in the call's metadata ("" when absent)."""
    found = ""
    for name, value in _metadata(context):
        if name == key:
            found = value
    return str(found)


def _request_id(request: object, context: grpc.aio.ServicerContext) -> str:
    explicit = getattr(request, "request_id", "") or _metadata_value(context, "x-request-id")
    return validate_request_id(str(explicit)) if explicit else uuid.uuid4().hex


class _Served:
    """What every RPC shares: the request id in every log line, the deadline, the drain's count of calls in
    flight, the size check, the metrics, and every failure (before or while a stream runs) turned into one
    well-formed status. :func:`rpc` and :func:`stream_rpc` call it in this order::

        try:
            try:
                served.enter(); <the handler>
            finally:
                served.leave()
        except (Exception, CancelledError) as exc:
            await served.failed(exc)  # aborts with the status, or re-raises a caller's cancellation
        except BaseException:
            served.closed(); raise
        else:
            served.succeeded()
        finally:
            served.reset()

    A plain object rather than an async context manager: every call passes here, and a generator-based
    context manager costs a generator and two more awaits per call.
    """

    __slots__ = (
        "context",
        "deadline_token",
        "drain",
        "id_token",
        "metadata_token",
        "name",
        "request",
        "servicer",
        "started",
        "task",
    )

    def __init__(self, servicer: ModelServicer, name: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.servicer, self.name, self.request, self.context = servicer, name, request, context
        self.id_token = request_id_var.set("-")
        self.metadata_token = _call_metadata.set(tuple(context.invocation_metadata() or ()))
        self.started = time.perf_counter()
        remaining = context.time_remaining()
        self.deadline_token = deadline_var.set(None if remaining is None else time.monotonic() + remaining)
        self.drain = current_drain.get()
        self.task: asyncio.Task[Any] | None = None

    def enter(self) -> None:
        """The request's id, a place among the calls in flight, the size check, the model its metadata names
        (each may refuse the call)."""
        request_id_var.set(_request_id(self.request, self.context))
        if self.drain is not None:
            self.task = self.drain.enter()
        validate_request_size(self.request.ByteSize(), self.servicer.limits)
        check_model_header(self.request, _metadata(self.context), self.servicer.limits)

    def leave(self) -> None:
        if self.drain is not None:
            self.drain.leave(self.task)

    def count(self, code: grpc.StatusCode) -> float:
        """Record the call in the metrics; returns its time in the server, from the handler's start."""
        seconds = time.perf_counter() - self.started
        metrics = self.servicer.metrics
        if metrics.enabled:
            model, backend = self.servicer.labels(self.request)
            metrics.request(self.name, model, backend, code.name, seconds)
        return seconds

    async def failed(self, exc: BaseException) -> None:
        """End the call with ``exc``'s status; a caller's cancellation (it left) is counted and re-raised."""
        if not isinstance(exc, asyncio.CancelledError):
            err = as_clemserve_error(exc, request_id_var.get())
        elif self.drain is not None and self.drain.cutting:
            err = self.drain.cut_error()  # the grace period is over: told so, not cut off like a lost connection
        else:
            self.count(grpc.StatusCode.CANCELLED)  # the caller left
            raise exc
        status = to_grpc_status(err, request_id_var.get(), self.servicer.redactor)
        # counted before the status goes out: a caller that reads the metrics next must find this call
        seconds = self.count(status.code)
        log.info("%s -> %s in %.2f ms: %s", self.name, err.code, seconds * 1000, status.details)
        await self.context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("unreachable: abort raises") from None

    def closed(self) -> None:
        self.count(grpc.StatusCode.CANCELLED)  # a stream closed under its handler

    def succeeded(self) -> None:
        if self.servicer.metrics.enabled or log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> OK in %.2f ms", self.name, self.count(grpc.StatusCode.OK) * 1000)

    def reset(self) -> None:
        request_id_var.reset(self.id_token)
        deadline_var.reset(self.deadline_token)
        _call_metadata.reset(self.metadata_token)


def rpc(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """A unary RPC served through :class:`_Served`."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        served = _Served(self, name, request, context)
        try:
            try:
                served.enter()
                response = await handler(self, request, context)
            finally:
                served.leave()
        except (Exception, asyncio.CancelledError) as exc:
            await served.failed(exc)
            raise AssertionError("unreachable: failed raises") from None
        except BaseException:
            served.closed()
            raise
        else:
            served.succeeded()
            return response
        finally:
            served.reset()

    setattr(wrapper, SERVED, True)
    return wrapper


def stream_rpc(handler: StreamHandler[Request, Response]) -> StreamHandler[Request, Response]:
    """A server-streaming RPC served through :class:`_Served`: an error mid-stream ends it with its status."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[Response]:
        served = _Served(self, name, request, context)
        try:
            try:
                served.enter()
                async for response in handler(self, request, context):
                    yield response
            finally:
                served.leave()
        except (Exception, asyncio.CancelledError) as exc:
            await served.failed(exc)
        except BaseException:
            served.closed()
            raise
        else:
            served.succeeded()
        finally:
            served.reset()

    setattr(wrapper, SERVED, True)
    return wrapper


def _caller(context: grpc.aio.ServicerContext) -> str:
    """Who is asking, for fair turns: the x-clemserve-caller metadata, else the connection's peer (one
    game process, one channel)."""
    return _metadata_value(context, "x-clemserve-caller") or str(context.peer() or "")


class ModelServicer(pb_grpc.ModelServiceServicer):
    """Each RPC converts its request, makes one call on the model cache, and converts the result."""

    def __init__(
        self,
        manager: ModelCache,
        limits: Limits | None = None,
        *,
        redactor: Redactor | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.manager = manager
        self.limits = limits or Limits()
        #: scrubs secrets out of every status that leaves the server
        self.redactor = redactor or Redactor()
        self.metrics = metrics or NoMetrics()
        #: a request's model and backend, as the metrics label it (only read when metrics are on)
        self.labels = RequestLabels(manager.resolve, manager.resolver.names, manager.loaded_names)

    @rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        selector, messages, args = convert.generate_request_from_proto(request, self.limits)
        spec, generation = await self.manager.generate(selector, messages, args, _caller(context))
        return convert.generation_to_proto(generation, spec, request_id_var.get())

    @rpc
    async def GenerateBatch(
        self, request: pb.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateBatchResponse:
        selector, rows, args = convert.batch_request_from_proto(request, self.limits)
        outcomes = await self.manager.generate_batch(selector, rows, args, _caller(context))
        return convert.batch_to_proto(outcomes, request_id_var.get(), self.redactor)

    @rpc
    async def ResolveModel(
        self, request: pb.ResolveModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveModelResponse:
        selector = convert.selector_from_proto(request.model, limits=self.limits)
        spec, served = await self.manager.describe(selector, request.describe)
        return convert.resolved_to_proto(spec, served)

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return convert.cache_to_proto(await self.manager.list_models())

    @rpc
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        model = await self.manager.load(convert.selector_from_proto(request.model, limits=self.limits))
        return pb.LoadModelResponse(status=convert.model_status_to_proto(model))

    @rpc
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        was_loaded = await self.manager.unload(convert.selector_from_proto(request.model, limits=self.limits))
        return pb.UnloadModelResponse(was_loaded=was_loaded)

    @rpc
    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        selector = convert.selector_from_proto(request.model, limits=self.limits)
        messages = convert.messages_from_proto(request.messages, limits=self.limits)
        return convert.token_count_to_proto(await self.manager.count_tokens(selector, messages))

    @stream_rpc
    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Generate, with the request's state and text sent as they happen; the reply is the last message.
        The caller leaving cancels the generation (and frees its slot)."""
        selector, messages, args = convert.generate_request_from_proto(request, self.limits)
        stream = self.manager.generate_stream(selector, messages, args, _caller(context))
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield convert.stream_item_to_proto(event, request_id_var.get())

    @stream_rpc
    async def LeaseModel(
        self, request: pb.LeaseModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LeaseModelResponse]:
        """Keep a model resident while the stream is open: the lease ends when the caller cancels, its
        channel goes away (the call is cancelled here) or the lease times out (a last message says so)."""
        selector, ttl = convert.lease_request_from_proto(request, self.limits)
        async with contextlib.aclosing(self.manager.lease(selector, _caller(context), ttl, request.load)) as events:
            async for event in events:
                yield convert.lease_event_to_proto(event)
