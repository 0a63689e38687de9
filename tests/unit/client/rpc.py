"""Stand-ins for failed gRPC calls, as the client sees them, for the client's tests without a server."""

from __future__ import annotations

from typing import Any

import grpc

from clemserve.registry import errors
from clemserve.service.status import to_grpc_status


class FakeRpcError(grpc.RpcError):
    """What a failed call raises on the client: code, details, trailing metadata."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


class _Status(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details, self.trailing_metadata = code, details, ()


#: what grpc itself fails a call with when nothing listens at the address
REFUSED = FakeRpcError(
    _Status(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: Connection refused")
)


def bare(code: grpc.StatusCode, details: str = "") -> FakeRpcError:
    """A status without clemserve's details (grpc's own, or a server that predates them)."""
    return FakeRpcError(_Status(code, details or code.name))


def decided(err: errors.ClemserveError) -> FakeRpcError:
    """A status the server decided, with its details, as its error mapping sends it."""
    return FakeRpcError(to_grpc_status(err, "rid-1"))
