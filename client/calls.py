"""The retry plan's two drivers (``retry``), blocking and asyncio: each sends the call, and sleeps or awaits
the pause the plan names; the plan decides everything else.

Every call whose request names a model also names it in the ``clemserve-model`` metadata, where an L7 gRPC
proxy (nginx, Envoy, a Gateway API ``GRPCRoute``) reads it to route the call to the server that holds the
model; the server checks that it names the model of the request body. The value is the model name with
every character outside printable ASCII, and space and ``%``, percent-encoded as UTF-8 (RFC 3986): an
ASCII name travels as it is, so a gateway matches it literally.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from .retry import ServerWait, StreamWait
from .streaming import StreamEvent

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

#: the call metadata that names the request's model (see the module's docstring)
MODEL_HEADER = "clemserve-model"
#: what a name keeps as it is in the header: printable ASCII but space and "%"
_KEPT = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")
#: whether a request message type has a ``model`` field (a ModelSelector), by type
_names_a_model: dict[type, bool] = {}


def encode_model_name(name: str) -> str:
    """The ``clemserve-model`` value for ``name``: ASCII-safe, and ``name`` itself when that is printable ASCII."""
    return urllib.parse.quote(name, safe=_KEPT)


@functools.lru_cache(maxsize=1024)
def _named(name: str) -> Metadata:
    return ((MODEL_HEADER, encode_model_name(name)),) if name else ()


@functools.lru_cache(maxsize=1024)
def _spec_named(text: str) -> Metadata:
    """The header for a spec selector's JSON text, read once per text (a game's model sends the same one on
    every turn); none where it holds no name (the server tells the caller what is wrong with it)."""
    try:
        spec = json.loads(text)
    except ValueError:
        return ()
    name = spec.get("model_name") if isinstance(spec, dict) else None
    return _named(name) if isinstance(name, str) else ()


def model_metadata(request: Any) -> Metadata:
    """The ``clemserve-model`` header for ``request``; none for a request that names no model (ListModels)."""
    kind = type(request)
    found = _names_a_model.get(kind)
    if found is None:
        descriptor = getattr(kind, "DESCRIPTOR", None)
        found = _names_a_model[kind] = descriptor is not None and "model" in descriptor.fields_by_name
    if not found:
        return ()
    selector = request.model
    which = selector.WhichOneof("selector")
    if which == "name":
        return _named(selector.name)
    if which == "spec":
        return _spec_named(selector.spec.json)
    return ()


def _metadata(request: Any, wait: ServerWait) -> Metadata | None:
    """The call's metadata: the request id where the request has no field for it, and the model's name."""
    own = wait.metadata_for(request)
    named = model_metadata(request)
    if not named:
        return own
    return named if own is None else (*own, *named)


def call(method: Callable[..., T], request: object, wait: ServerWait) -> T:
    """A unary call; while the server is briefly away it is sent again (none of its reply reached the caller)."""
    while True:
        try:
            reply: T = method(request, timeout=wait.timeout(), metadata=_metadata(request, wait))
        except grpc.RpcError as exc:
            time.sleep(wait.retry_after(exc))
        else:
            wait.answered()
            return reply


async def acall(method: Callable[..., Any], request: object, wait: ServerWait) -> Any:
    """The asyncio twin of :func:`call`."""
    while True:
        try:
            reply = await method(request, timeout=wait.timeout(), metadata=_metadata(request, wait))
        except grpc.RpcError as exc:
            await asyncio.sleep(wait.retry_after(exc))
        else:
            wait.answered()
            return reply


def stream(method: Callable[..., Any], request: object, wait: StreamWait) -> Iterator[StreamEvent]:
    """A server-streaming call's events; leaving the loop early cancels the call on the server."""
    while True:
        rpc = method(request, timeout=wait.timeout(), metadata=_metadata(request, wait))
        try:
            for message in rpc:
                yield wait.event(message)
            wait.answered()
            return
        except grpc.RpcError as exc:
            pause = wait.retry_after(exc)
        finally:
            rpc.cancel()  # a no-op once the stream has ended
        time.sleep(pause)


async def astream(method: Callable[..., Any], request: object, wait: StreamWait) -> AsyncGenerator[StreamEvent, None]:
    """The asyncio twin of :func:`stream`."""
    while True:
        rpc = method(request, timeout=wait.timeout(), metadata=_metadata(request, wait))
        try:
            async for message in rpc:
                yield wait.event(message)
            wait.answered()
            return
        except grpc.RpcError as exc:
            pause = wait.retry_after(exc)
        finally:
            rpc.cancel()
        await asyncio.sleep(pause)
