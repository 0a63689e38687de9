"""The retry plan's two drivers (``retry``), blocking and asyncio: each sends the call, and sleeps or awaits
the pause the plan names; the plan decides everything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from .retry import ServerWait, StreamWait
from .streaming import StreamEvent

T = TypeVar("T")


def call(method: Callable[..., T], request: object, wait: ServerWait) -> T:
    """A unary call; while the server is briefly away it is sent again (none of its reply reached the caller)."""
    while True:
        try:
            reply: T = method(request, timeout=wait.timeout(), metadata=wait.metadata_for(request))
        except grpc.RpcError as exc:
            time.sleep(wait.retry_after(exc))
        else:
            wait.answered()
            return reply


async def acall(method: Callable[..., Any], request: object, wait: ServerWait) -> Any:
    """The asyncio twin of :func:`call`."""
    while True:
        try:
            reply = await method(request, timeout=wait.timeout(), metadata=wait.metadata_for(request))
        except grpc.RpcError as exc:
            await asyncio.sleep(wait.retry_after(exc))
        else:
            wait.answered()
            return reply


def stream(method: Callable[..., Any], request: object, wait: StreamWait) -> Iterator[StreamEvent]:
    """A server-streaming call's events; leaving the loop early cancels the call on the server."""
    while True:
        rpc = method(request, timeout=wait.timeout(), metadata=wait.metadata_for(request))
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
        rpc = method(request, timeout=wait.timeout(), metadata=wait.metadata_for(request))
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
