"""The model a call names in its metadata, where gateways read it.

clemserve's client sends the name of the request's model as ``clemserve-model`` metadata on every call that
names a model, so that an L7 gRPC proxy (nginx, Envoy, a Gateway API ``GRPCRoute``) can route the call by
header to the server that holds the model. A call whose header names another model than its body would be
routed for one model and answered for another: it is refused. A call without the header (a client in
another language, ``buf curl``) is served as before.

The value is the model name, percent-encoded (RFC 3986, UTF-8) where it is not printable ASCII, and for
space and ``%``; it is decoded here before the comparison.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from clemserve.registry.errors import InvalidArgumentError

from .convert import selector_from_proto
from .validation import Limits

HEADER = "clemserve-model"
#: whether a request message type has a ``model`` field (a ModelSelector), by type
_names_a_model: dict[type, bool] = {}


def check_model_header(request: Any, metadata: Any, limits: Limits) -> None:
    """Raise InvalidArgumentError where the call's ``clemserve-model`` metadata names another model than
    ``request.model``; a call without it, or a request that names no model, passes."""
    sent = None
    for key, value in metadata:
        if key == HEADER:
            sent = value
    if sent is None or not _names_model(type(request)):
        return
    header = _decoded(sent)
    selector = selector_from_proto(request.model, limits=limits)
    body = selector if isinstance(selector, str) else selector.get("model_name")
    if header != body:
        raise InvalidArgumentError(
            HEADER,
            f"the metadata names model {header!r} but the request's model field names {body!r}: a gateway "
            f"routes by the metadata, so the two must agree (or leave the metadata out)",
        )


def _names_model(kind: type) -> bool:
    found = _names_a_model.get(kind)
    if found is None:
        descriptor = getattr(kind, "DESCRIPTOR", None)
        found = _names_a_model[kind] = descriptor is not None and "model" in descriptor.fields_by_name
    return found


def _decoded(value: str | bytes) -> str:
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
        return text if "%" not in text else urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidArgumentError(HEADER, "is not a percent-encoded UTF-8 model name") from None
