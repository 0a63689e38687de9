"""clemcore backend ``clemserve``: clembench games play the models of a clemserve server.

``clemserve clemcore-setup`` copies this file into a clemcore working directory as ``clemserve_api.py``,
beside a ``model_registry.json`` whose entries say ``"backend": "clemserve"``. clemcore finds it there as it
finds its own backends, so ``load_model(s)``, ``generate_response`` and ``generate_batch_response`` reach the
server unchanged. It imports clemcore and clemserve.client only, and defines one Backend class: clemcore
refuses a backend file with more than one.

The server address, first found wins: the model name's route (``CLEMSERVE_ROUTES``, ``CLEMSERVE_ROUTES_FILE``;
see clemserve.client.routes), ``CLEMSERVE_ADDRESS``, the entry's ``model_config.clemserve_address`` (what
clemcore-setup recorded), localhost:50051. What is set when the games run decides before what setup recorded,
and, as in clemserve.client, a model's route before the one address for every model.

The triple is the server's, ``clem_player`` block included: its call_start and call_duration time the
generation where it ran, as in-process clemcore times its backend call, and its model_name is the entry's.
A context overflow is raised as clemcore's ``ContextExceededError``; clemserve's other errors pass through
(an unknown model and invalid arguments are ValueErrors, as in clemcore). Nothing is retried here: the
server retries what is transient, the client waits for a server that restarts (``CLEMSERVE_WAIT_FOR_SERVER``,
so a ``clem run`` plays on across a restart), and clemcore's blanket retry would repeat deterministic failures.
While it waits, the terminal says so: the server's going away and its return (after how long, and how long
the first call then took) are printed on stderr once per outage, besides clembench.log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clemcore.backends import Backend, BatchGenerativeModel, ModelSpec
from clemcore.backends.utils import ContextExceededError

import clemserve.client
from clemserve.client.retry import print_outage, watch_outages
from clemserve.client.routes import route_for


class ClemserveBackend(Backend):  # type: ignore[misc]  # clemcore ships no type information
    """clemcore makes one per model it loads; each model resolves its entry on the server."""

    def get_model_for(self, model_spec: ModelSpec) -> ClemserveModel:
        return ClemserveModel(model_spec)


class ClemserveModel(BatchGenerativeModel):  # type: ignore[misc]
    """clemcore's Model, answered by clemserve; clemcore's gen args go with every request."""

    def __init__(self, model_spec: ModelSpec) -> None:
        super().__init__(model_spec)
        config = getattr(model_spec, "model_config", None) or {}
        address = (
            route_for(model_spec.model_name)
            or os.environ.get("CLEMSERVE_ADDRESS")
            or config.get("clemserve_address")
            or None
        )
        watch_outages(print_outage)  # clemcore logs to clembench.log only: an outage shows on the terminal too
        # resolving now makes an unknown name or an unreachable server fail in load_models, as clemcore's do
        self.remote = clemserve.client.get_model_for(model_spec.model_name, address=address)

    def generate_response(self, messages: list[dict[str, Any]]) -> tuple[Any, Any, str]:
        with _as_clemcore_errors():
            self.remote.set_gen_args(**self.gen_args)
            return self.remote.generate_response(messages)

    def generate_batch_response(self, batch_messages: list[list[dict[str, Any]]]) -> list[tuple[Any, Any, str]]:
        with _as_clemcore_errors():
            self.remote.set_gen_args(**self.gen_args)
            return self.remote.generate_batch_response(batch_messages)


@contextmanager
def _as_clemcore_errors() -> Iterator[None]:
    """Games catch ``clemcore.backends.utils.ContextExceededError``; the numbers and message stay the server's."""
    try:
        yield
    except clemserve.client.ContextExceededError as exc:
        raise ContextExceededError(
            exc.info_str, tokens_used=exc.tokens_used, tokens_left=exc.tokens_left, context_size=exc.context_size
        ) from exc
