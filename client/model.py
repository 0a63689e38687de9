"""clembench's Model surface, served by clemserve: ``get_model_for(...).generate_response(messages)``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

from .calls import acall, astream, call, model_metadata, stream
from .channel import address_for, aio_channel_for, channel_for, channel_key
from .convert import (
    Selector,
    Triple,
    gen_args_to_proto,
    messages_to_proto,
    selector_name,
    selector_spec,
    selector_to_proto,
    spec_from_proto,
    triple_from_proto,
)
from .errors import error_from_row
from .retry import Lease, ServerWait, StreamWait, found_away
from .spend import Spend, total
from .streaming import StreamEvent, StreamReply, TextDelta

PROGRAMMATIC_SPECS = ("mock", "programmatic")
HUMAN_SPECS = ("human", "terminal")
DEFAULT_GEN_ARGS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 300}


@dataclass(frozen=True)
class TokenCount:
    prompt_tokens: int
    context_size: int
    prompt: str


class _ModelBase:
    """What sync and asyncio models share: the spec, gen args, identity (clembench's Model)."""

    def __init__(
        self,
        model_spec: ModelSpec,
        *,
        address: str | None = None,
        gen_args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        token: str | None = None,
        lease: bool = True,
    ) -> None:
        assert "model_name" in model_spec, "The passed ModelSpec must have a `model_name` attribute"
        self.model_spec = model_spec
        #: the server: ``address=``, else the model's route (CLEMSERVE_ROUTES), else the default address
        self.address = address or address_for(str(model_spec["model_name"]))
        #: sent as "authorization: Bearer ..." (None: connect()'s token for the address, else CLEMSERVE_TOKEN)
        self._token = token
        #: seconds per call (None: no deadline); generations on a cold model include its load
        self.timeout = timeout
        self._gen_args: dict[str, Any] = dict(DEFAULT_GEN_ARGS if gen_args is None else gen_args)
        self._lease = Lease(lease)

    @property
    def model_spec(self) -> ModelSpec:
        """The resolved spec; every request names it in full, so the server needs no second lookup."""
        return self._model_spec

    @model_spec.setter
    def model_spec(self, spec: ModelSpec) -> None:
        self._model_spec = spec
        self._selector = pb.ModelSelector(spec=pb.ModelSpec(json=spec.to_string()))

    @property
    def lease(self) -> bool:
        """Hold a lease (LeaseModel) from the first generation on, so the server keeps the model loaded."""
        return self._lease.wanted

    @lease.setter
    def lease(self, wanted: bool) -> None:
        self._lease.wanted = wanted

    @property
    def name(self) -> str:
        return str(self.model_spec["model_name"])

    @property
    def gen_args(self) -> dict[str, Any]:
        return self._gen_args

    def set_gen_args(self, **gen_args: Any) -> None:
        """Replace all generation arguments, as clembench does."""
        self._gen_args = dict(gen_args)

    def set_gen_arg(self, arg_name: str, arg_value: Any) -> None:
        self._gen_args[arg_name] = arg_value

    def get_gen_arg(self, arg_name: str) -> Any:
        assert arg_name in self._gen_args, f"No '{arg_name}' in gen_args given but is expected"
        return self._gen_args[arg_name]

    @property
    def temperature(self) -> float:
        return float(self.get_gen_arg("temperature"))

    @property
    def max_tokens(self) -> int:
        return int(self.get_gen_arg("max_tokens"))

    def supports_batching(self) -> bool:
        return True

    def reset(self) -> None:
        """clembench's per-episode hook; nothing to reset here."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModelBase) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]  # clembench models are unhashable

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} address={self.address!r}>"

    def _lease_request(self) -> pb.LeaseModelRequest:
        return pb.LeaseModelRequest(model=self._selector)

    def __del__(self) -> None:
        """A model dropped without ``close()`` releases its lease; an asyncio call whose loop has closed is
        gone already."""
        lease = getattr(self, "_lease", None)
        if lease is not None and lease.call is not None:
            with contextlib.suppress(RuntimeError):
                lease.drop()

    def _request(self, messages: Sequence[Mapping[str, Any]]) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            model=self._selector,
            messages=messages_to_proto(messages),
            args=gen_args_to_proto(self._gen_args),
        )

    def _stream_request(self, messages: Sequence[Mapping[str, Any]]) -> pb.GenerateStreamRequest:
        return pb.GenerateStreamRequest(
            model=self._selector,
            messages=messages_to_proto(messages),
            args=gen_args_to_proto(self._gen_args),
        )

    def _batch_request(self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]) -> pb.GenerateBatchRequest:
        conversations = [
            pb.Conversation(messages=messages_to_proto(messages, f"batch[{i}]"))
            for i, messages in enumerate(batch_messages)
        ]
        return pb.GenerateBatchRequest(
            model=self._selector, conversations=conversations, args=gen_args_to_proto(self._gen_args)
        )

    def _count_request(self, messages: Sequence[Mapping[str, Any]]) -> pb.CountTokensRequest:
        return pb.CountTokensRequest(
            model=self._selector,
            messages=messages_to_proto(messages),
        )


def _outcomes(reply: pb.GenerateBatchResponse) -> list[Triple | ClemserveError]:
    return [
        error_from_row(row.error) if row.WhichOneof("result") == "error" else triple_from_proto(row.response)
        for row in reply.results
    ]


def _batch_spend(reply: pb.GenerateBatchResponse) -> Spend:
    return total(Spend.of_reply(row.response) for row in reply.results if row.HasField("response"))


def _raise_first(outcomes: list[Triple | ClemserveError]) -> list[Triple]:
    for outcome in outcomes:
        if isinstance(outcome, ClemserveError):
            raise outcome
    return [o for o in outcomes if not isinstance(o, ClemserveError)]


class Model(_ModelBase):
    """A model served by clemserve, with clembench's ``Model`` methods (blocking calls)."""

    _sync_stub: pb_grpc.ModelServiceStub | None = None
    #: the channel_key of the stub's channel: each call is told it instead of reading it again
    _channel_key: Any = None
    #: the tokens this model's replies generated so far (their usage), for progress displays
    tokens_generated = 0
    #: what this model's calls spent so far (tokens, cost, compute seconds): the triple stays clemcore's
    spent = Spend()

    def _stub(self) -> pb_grpc.ModelServiceStub:
        if self._sync_stub is None:
            self._channel_key = channel_key(self.address, self._token)
            self._sync_stub = pb_grpc.ModelServiceStub(channel_for(self.address, self._token))
        return self._sync_stub

    def _keep_lease(self) -> None:
        """Before a generation: take the lease, or renew it once it expired; otherwise only a clock check."""
        if self._lease.due():
            self._hold_lease()

    def _hold_lease(self) -> None:
        """Take (or renew an expired) lease; the sync call is kept open without a thread."""
        lease = self._lease
        lease.drop()
        request = self._lease_request()
        rpc = self._stub().LeaseModel(request, metadata=model_metadata(request))
        try:
            lease.taken(rpc, next(rpc), self.name)
        except grpc.RpcError as exc:
            lease.refused(exc, self.name)
            found_away(self.address, exc, self._channel_key)

    def close(self) -> None:
        """Release the lease (the server may then unload the model when it needs the memory or it idles)."""
        self._lease.drop()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate_response(self, messages: Sequence[Mapping[str, Any]]) -> Triple:
        """``(prompt, response_object, response_text)``, exactly as in-process clembench returns them."""
        self._keep_lease()
        stub = self._stub()
        wait = ServerWait(self.address, self.timeout, self._token, key=self._channel_key)
        reply = call(stub.Generate, self._request(messages), wait)
        self.tokens_generated += reply.usage.completion_tokens
        self.spent += Spend.of_reply(reply)
        return triple_from_proto(reply)

    def generate_stream(self, messages: Sequence[Mapping[str, Any]]) -> Iterator[StreamEvent]:
        """The reply as it happens: StreamState events (loading, queued, ready), TextDelta pieces, and last a
        StreamReply with generate_response's triple. Leaving the loop early cancels the call on the server."""
        self._keep_lease()
        wait = StreamWait(self.address, self.timeout, self._token)
        for event in stream(self._stub().GenerateStream, self._stream_request(messages), wait):
            if isinstance(event, StreamReply):
                self.spent += event.spend
            yield event

    def stream_text(self, messages: Sequence[Mapping[str, Any]]) -> Iterator[str]:
        """Only the text pieces of :meth:`generate_stream`."""
        return (event.text for event in self.generate_stream(messages) if isinstance(event, TextDelta))

    def generate_batch_response(self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]) -> list[Triple]:
        """One result per conversation, in order, from one GenerateBatch call (the server batches the rows).
        As in clembench, a failing row fails the call: its error is raised; see ``generate_batch``."""
        return _raise_first(self.generate_batch(batch_messages))

    def generate_batch(self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]) -> list[Triple | ClemserveError]:
        """One outcome per conversation: its triple, or the error that row alone got."""
        self._keep_lease()
        wait = ServerWait(self.address, self.timeout, self._token)
        reply = call(self._stub().GenerateBatch, self._batch_request(batch_messages), wait)
        self.tokens_generated += sum(row.response.usage.completion_tokens for row in reply.results)
        self.spent += _batch_spend(reply)
        return _outcomes(reply)

    def count_tokens(self, messages: Sequence[Mapping[str, Any]]) -> TokenCount:
        wait = ServerWait(self.address, self.timeout, self._token)
        reply = call(self._stub().CountTokens, self._count_request(messages), wait)
        return TokenCount(reply.prompt_tokens, reply.context_size, reply.prompt)

    def as_async(self) -> AsyncModel:
        """The asyncio twin of this model, with the same spec and a copy of the gen args."""
        return AsyncModel(
            self.model_spec,
            address=self.address,
            gen_args=self._gen_args,
            timeout=self.timeout,
            token=self._token,
            lease=self.lease,
        )


class AsyncModel(_ModelBase):
    """The asyncio twin of :class:`Model`: same names, awaitable calls (for players run concurrently)."""

    def _stub(self) -> pb_grpc.ModelServiceStub:
        return pb_grpc.ModelServiceStub(aio_channel_for(self.address, self._token))

    async def _acall(self, method: Callable[..., Any], request: object) -> Any:
        return await acall(method, request, ServerWait(self.address, self.timeout, self._token))

    #: the lease being taken, which concurrent first calls share instead of each taking one
    _leasing: asyncio.Future[None] | None = None

    async def _keep_lease(self) -> None:
        """The asyncio twin of :meth:`Model._keep_lease`."""
        if self._lease.due():
            if self._leasing is None or self._leasing.done():
                self._leasing = asyncio.ensure_future(self._hold_lease())
            await asyncio.shield(self._leasing)

    async def _hold_lease(self) -> None:
        lease = self._lease
        lease.drop()
        request = self._lease_request()
        rpc = self._stub().LeaseModel(request, metadata=model_metadata(request))
        try:
            lease.taken(rpc, await rpc.read(), self.name)
        except grpc.RpcError as exc:
            lease.refused(exc, self.name)
            found_away(self.address, exc, channel_key(self.address, self._token))

    async def aclose(self) -> None:
        """Release the lease."""
        self._lease.drop()

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    #: what this model's calls spent so far, as :attr:`Model.spent`
    spent = Spend()

    async def generate_response(self, messages: Sequence[Mapping[str, Any]]) -> Triple:
        await self._keep_lease()
        reply = await self._acall(self._stub().Generate, self._request(messages))
        self.spent += Spend.of_reply(reply)
        return triple_from_proto(reply)

    async def generate_stream(self, messages: Sequence[Mapping[str, Any]]) -> AsyncIterator[StreamEvent]:
        """The asyncio twin of :meth:`Model.generate_stream`."""
        await self._keep_lease()
        wait = StreamWait(self.address, self.timeout, self._token)
        events = astream(self._stub().GenerateStream, self._stream_request(messages), wait)
        async with contextlib.aclosing(events):  # leaving the loop early cancels the call at once
            async for event in events:
                if isinstance(event, StreamReply):
                    self.spent += event.spend
                yield event

    async def generate_batch_response(self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]) -> list[Triple]:
        return _raise_first(await self.generate_batch(batch_messages))

    async def generate_batch(
        self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]
    ) -> list[Triple | ClemserveError]:
        await self._keep_lease()
        reply = await self._acall(self._stub().GenerateBatch, self._batch_request(batch_messages))
        self.spent += _batch_spend(reply)
        return _outcomes(reply)

    async def count_tokens(self, messages: Sequence[Mapping[str, Any]]) -> TokenCount:
        reply = await self._acall(self._stub().CountTokens, self._count_request(messages))
        return TokenCount(reply.prompt_tokens, reply.context_size, reply.prompt)


class CustomResponseModel(Model):
    """``mock``/``programmatic``: the game's player answers (clembench's CustomResponseModel)."""

    def __init__(self, model_spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(model_spec, **{"gen_args": {"temperature": 0.0}, **kwargs})
        self.players: list[Any] = []

    def generate_response(self, messages: Sequence[Mapping[str, Any]]) -> Triple:
        if not self.players:
            raise NotImplementedError(f"{self.name}: the game's player answers; no player is attached")
        return {}, {}, self.players[0]._custom_response(messages[-1])

    def generate_batch_response(self, batch_messages: Sequence[Sequence[Mapping[str, Any]]]) -> list[Triple]:
        return [self.generate_response(messages) for messages in batch_messages]


class HumanModel(Model):
    """``human``/``terminal``: the game's player reads the terminal instead (as in clembench)."""

    def generate_response(self, messages: Sequence[Mapping[str, Any]]) -> Triple:
        raise NotImplementedError(f"{self.name}: a human player answers through the game, not a model")


def _server(selector: Selector, address: str | None) -> str:
    """``address`` when given, else the route of the selector's model name, else the default address."""
    return address or address_for(selector_name(selector))


def _local_model(spec: ModelSpec, address: str | None) -> Model | None:
    """clembench resolves human and programmatic names without any registry; so does the client."""
    name = spec.get("model_name")
    if name in PROGRAMMATIC_SPECS:
        return CustomResponseModel(
            ModelSpec(model_name=name, backend="_player_programmed"), address=address, lease=False
        )
    if name in HUMAN_SPECS:
        return HumanModel(ModelSpec(model_name=name, backend="_player_human"), address=address, lease=False)
    return None


def resolve(
    selector: Selector, *, address: str | None = None, timeout: float | None = None, token: str | None = None
) -> ModelSpec:
    """The server's unified registry entry for ``selector``; loads nothing."""
    address = _server(selector, address)
    stub = pb_grpc.ModelServiceStub(channel_for(address, token))
    request = pb.ResolveModelRequest(model=selector_to_proto(selector))
    return spec_from_proto(call(stub.ResolveModel, request, ServerWait(address, timeout, token)).model_spec)


def get_model_for(
    model_spec: Selector,
    *,
    address: str | None = None,
    timeout: float | None = None,
    token: str | None = None,
    lease: bool = True,
) -> Model:
    """clembench's ``backends.get_model_for(name | dict | ModelSpec)``, served by clemserve.

    The selector is resolved on the server now, so an unknown model fails here, as in clembench.
    ``token`` authenticates the calls (default: ``connect()``'s token for the address, else ``CLEMSERVE_TOKEN``).
    ``lease``: from its first generation on, the model holds a lease that keeps it loaded on the server until
    ``close()`` (or ``with get_model_for(...) as model:``), the model's garbage collection, the end of this
    process or the server's lease timeout (renewed at the next call).
    The server: ``address``, else the model name's route (``CLEMSERVE_ROUTES``; see
    :mod:`clemserve.client.routes`), else ``connect()``'s address, ``CLEMSERVE_ADDRESS``, localhost:50051.
    """
    local = _local_model(selector_spec(model_spec), address)
    if local is not None:
        return local
    address = _server(model_spec, address)
    spec = resolve(model_spec, address=address, timeout=timeout, token=token)
    return Model(spec, address=address, timeout=timeout, token=token, lease=lease)


async def get_async_model_for(
    model_spec: Selector,
    *,
    address: str | None = None,
    timeout: float | None = None,
    token: str | None = None,
    lease: bool = True,
) -> AsyncModel:
    """The asyncio twin of :func:`get_model_for`."""
    address = _server(model_spec, address)
    stub = pb_grpc.ModelServiceStub(aio_channel_for(address, token))
    request = pb.ResolveModelRequest(model=selector_to_proto(model_spec))
    reply = await acall(stub.ResolveModel, request, ServerWait(address, timeout, token))
    return AsyncModel(spec_from_proto(reply.model_spec), address=address, timeout=timeout, token=token, lease=lease)


def load_model(model_spec: Selector, gen_args: Mapping[str, Any] | None = None, *, address: str | None = None) -> Model:
    """clemcore's ``load_model``: resolve, then set the gen args (default temperature 0.0, max_tokens 300)."""
    return load_models([model_spec], gen_args, address=address)[0]


def load_models(
    model_specs: Sequence[Selector], gen_args: Mapping[str, Any] | None = None, *, address: str | None = None
) -> list[Model]:
    """clemcore's ``load_models``: every selector resolves before anything is returned (fail fast)."""
    models = [get_model_for(spec, address=address) for spec in model_specs]
    for model in models:
        model.set_gen_args(**(DEFAULT_GEN_ARGS if gen_args is None else gen_args))
    return models
