"""clemserve.registry: model specs, the model and key registries, and message clean-up, in pure Python.

Shared by the server and the client; nothing here imports grpc, torch or nltk.
"""

from __future__ import annotations

from .errors import (
    ERRORS_BY_CODE,
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
    UnauthenticatedError,
    UnavailableError,
)
from .keys import Key, KeyFileError, KeyRegistry
from .messages import ensure_alternating_roles, ensure_alternating_roles_batch
from .model_registry import ModelRegistry, RegistryFileError
from .spec import HUMAN_SPECS, PROGRAMMATIC_SPECS, ModelSpec, UnificationError, unify_values

__all__ = [
    "ERRORS_BY_CODE",
    "HUMAN_SPECS",
    "PROGRAMMATIC_SPECS",
    "CancelledError",
    "ClemserveError",
    "ContextExceededError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "Key",
    "KeyFileError",
    "KeyRegistry",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelSpec",
    "PermissionDeniedError",
    "RegistryFileError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnificationError",
    "ensure_alternating_roles",
    "ensure_alternating_roles_batch",
    "unify_values",
]
