"""clemserve's error types, shared by the server and the client.

The server's backends and registry raise these; one module on each side of the wire converts them
to and from gRPC statuses (``clemserve.service.status`` and ``clemserve.client.errors``). Each class
names the gRPC status code it travels as, by name, so this module needs no grpc import.

Where clembench raises ``ValueError`` (unknown model, bad arguments), the matching classes here
subclass ``ValueError`` too, so ``except ValueError`` in existing game code keeps working.
"""

from __future__ import annotations


class ClemserveError(Exception):
    """Base class. ``code`` is the gRPC status code name this error travels as."""

    code: str = "UNKNOWN"
    #: a stable, machine-readable reason (google.rpc.ErrorInfo.reason)
    reason: str = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        request_id: str = "",
        metadata: dict[str, str] | None = None,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        #: machine-readable facts (google.rpc.ErrorInfo.metadata), e.g. {"upstream_status": "503"}
        self.metadata: dict[str, str] = dict(metadata or {})
        #: when retrying may help, after how many seconds (google.rpc.RetryInfo)
        self.retry_after_s = retry_after_s


class ServerError(ClemserveError):
    """A status without a more specific class here (UNIMPLEMENTED, UNAUTHENTICATED, ...)."""

    def __init__(self, code: str, message: str, *, reason: str = "", request_id: str = "") -> None:
        super().__init__(message, request_id=request_id)
        self.code = code
        self.reason = reason or code

    def __str__(self) -> str:
        return self.message


class ModelNotFoundError(ClemserveError, ValueError):
    """No registry entry unifies with the selector (clembench: ``ValueError``)."""

    code = "NOT_FOUND"
    reason = "MODEL_NOT_FOUND"

    def __init__(self, message: str, *, selector: str = "", request_id: str = "") -> None:
        super().__init__(message, request_id=request_id)
        self.selector = selector


class InvalidArgumentError(ClemserveError, ValueError):
    """A malformed request. ``field`` names the offending field, e.g. ``messages[2].role``."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, request_id: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message, request_id=request_id)
        self.field = field
        self.description = message


class UnauthenticatedError(ClemserveError):
    """The call carried no valid token (``authorization: Bearer <token>`` metadata)."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(ClemserveError):
    """The caller may not do this: an admin-only RPC without the admin token, or a selector that adds a
    field the server does not let clients choose (``ErrorInfo.metadata["field"]`` names it)."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class FailedPreconditionError(ClemserveError):
    """Something must be installed or configured on the server first (a package, a key, weights).

    ``subject`` names what is missing (``pip install clemserve[hf]``, ``key.json: openai``, ...); it
    never carries a secret.
    """

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, subject: str = "", request_id: str = "") -> None:
        super().__init__(message, request_id=request_id)
        self.subject = subject


class ResourceExhaustedError(ClemserveError):
    """Not enough memory to load a model, a full queue, or a provider's rate limit."""

    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        required_bytes: int = 0,
        available_bytes: int = 0,
        retry_after_s: float = 0.0,
        request_id: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, metadata=metadata, retry_after_s=retry_after_s)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes


class UnavailableError(ClemserveError):
    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class ShuttingDownError(UnavailableError):
    """The server is stopping: it takes no new calls, and ends those still running when its grace period
    is over. The client waits for it to come back (``CLEMSERVE_WAIT_FOR_SERVER``)."""

    reason = "SHUTTING_DOWN"


class DeadlineExceededError(ClemserveError):
    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class CancelledError(ClemserveError):
    code = "CANCELLED"
    reason = "CANCELLED"


class InternalError(ClemserveError):
    """An unexpected failure. The message is generic; the detail is in the server log under the request id."""

    code = "INTERNAL"
    reason = "INTERNAL"


class ContextExceededError(ClemserveError):
    """The prompt plus ``max_tokens`` does not fit the model's context.

    Same constructor, attributes and message as clembench's ``ContextExceededError``:
    ``str(err) == f"{info_str} {tokens_used}/{context_size}"``.
    """

    code = "OUT_OF_RANGE"
    reason = "CONTEXT_EXCEEDED"

    def __init__(
        self,
        info_str: str = "Context limit exceeded",
        tokens_used: int = 0,
        tokens_left: int = 0,
        context_size: int = 0,
        *,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{info_str} {tokens_used}/{context_size}", request_id=request_id)
        self.info_str = info_str
        self.tokens_used = tokens_used
        self.tokens_left = tokens_left
        self.context_size = context_size


#: every concrete error class by the gRPC code name it travels as (the client maps back with this)
ERRORS_BY_CODE: dict[str, type[ClemserveError]] = {
    cls.code: cls
    for cls in (
        ModelNotFoundError,
        InvalidArgumentError,
        UnauthenticatedError,
        PermissionDeniedError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
        ContextExceededError,
    )
}
