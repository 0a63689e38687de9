"""clemserve's client: ``import clemserve.client as backends`` and clembench game code runs unchanged.

    import clemserve.client as backends
    model = backends.get_model_for("smollm2-135m-instruct")
    prompt, response, response_text = model.generate_response(messages)

The server address comes from ``address=``, else the model name's route (``CLEMSERVE_ROUTES``, see
``clemserve.client.routes``), else ``connect(address)``, else ``CLEMSERVE_ADDRESS``, else localhost:50051.
This package needs grpcio and protobuf only: no torch, no transformers.
"""

from __future__ import annotations

from clemserve.registry import ModelSpec
from clemserve.registry.errors import (
    CancelledError,
    ClemserveError,
    ContextExceededError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    ShuttingDownError,
    UnauthenticatedError,
    UnavailableError,
)

from .admin import ModelStatus, list_models, preload, unload
from .channel import connect, default_address
from .model import (
    AsyncModel,
    CustomResponseModel,
    HumanModel,
    Model,
    TokenCount,
    get_async_model_for,
    get_model_for,
    load_model,
    load_models,
    resolve,
)
from .streaming import StreamEvent, StreamReply, StreamState, TextDelta

__all__ = [
    "AsyncModel",
    "CancelledError",
    "ClemserveError",
    "ContextExceededError",
    "CustomResponseModel",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "HumanModel",
    "InternalError",
    "InvalidArgumentError",
    "Model",
    "ModelNotFoundError",
    "ModelSpec",
    "ModelStatus",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerError",
    "ShuttingDownError",
    "StreamEvent",
    "StreamReply",
    "StreamState",
    "TextDelta",
    "TokenCount",
    "UnauthenticatedError",
    "UnavailableError",
    "connect",
    "default_address",
    "get_async_model_for",
    "get_model_for",
    "list_models",
    "load_model",
    "load_models",
    "preload",
    "resolve",
    "unload",
]
