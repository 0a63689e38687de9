"""Conversion between clemserve.v1 messages and domain types, in one place."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.v1 import clemserve_pb2 as pb

from .domain import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    CacheSnapshot,
    FinishReason,
    GenArgs,
    Generation,
    GpuMemory,
    ImagePart,
    LeaseEvent,
    Message,
    ModelSnapshot,
    ModelState,
    Spend,
    TokenCount,
)
from .provenance import Provenance
from .security.redaction import Redactor
from .status import as_clemserve_error, to_row_error
from .streaming import StreamEvent, TextDelta
from .validation import (
    DEFAULT_LIMITS,
    Limits,
    parse_json_object,
    validate_extra_args,
    validate_max_tokens,
    validate_message_count,
    validate_message_sizes,
    validate_temperature,
)

Selector = str | dict[str, Any]


def _json_object(text: str, field: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    return parse_json_object(text, field, limits)


def _unserializable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False)``, the same text, from one C encoder made once: ``dumps`` makes
    a new one per call, a third of the time a reply's two JSON fields take. Without the check for circular
    containers (a prompt or response object is plain data; a cycle fails as RecursionError)."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(ensure_ascii=False).encode
    encoder = c_make_encoder(
        None, _unserializable, json.encoder.encode_basestring, None, ": ", ", ", False, False, True
    )

    def json_text(value: Any) -> str:
        return "".join(encoder(value, 0))

    return json_text


_json_text = _json_encoder()


_FINISH_REASONS = {reason: pb.FinishReason.Value(f"FINISH_REASON_{reason.name}") for reason in FinishReason}
_CHECKED_SPECS_SIZE = 1024
_checked_specs: dict[tuple[str, str, Limits], dict[str, Any]] = {}


def selector_from_proto(selector: pb.ModelSelector, field: str = "model", limits: Limits = DEFAULT_LIMITS) -> Selector:
    kind = selector.WhichOneof("selector")
    if kind == "name":
        if not selector.name:
            raise InvalidArgumentError(f"{field}.name", "must not be empty")
        return selector.name
    if kind == "spec":
        # a game's Model sends the same resolved spec on every turn: parse and check each text once
        text = selector.spec.json
        spec = _checked_specs.get((text, field, limits))
        if spec is None:
            spec = _json_object(text, f"{field}.spec.json", limits)
            if not spec:
                raise InvalidArgumentError(f"{field}.spec.json", "must be a non-empty JSON object")
            if len(_checked_specs) >= _CHECKED_SPECS_SIZE:
                _checked_specs.pop(next(iter(_checked_specs)))
            _checked_specs[(text, field, limits)] = spec
        return spec  # shared: selectors are only read (resolution copies what it keeps)
    raise InvalidArgumentError(field, "is required: set a model name or spec")


def messages_from_proto(
    messages: Sequence[pb.Message], field: str = "messages", limits: Limits = DEFAULT_LIMITS
) -> list[Message]:
    validate_message_count(len(messages), limits, field)
    result: list[Message] = []
    for i, message in enumerate(messages):
        converted: Message = {}
        if message.extra_json:
            converted = _json_object(message.extra_json, f"{field}[{i}].extra_json", limits)
            clash = {"role", "content", "image"} & converted.keys()
            if clash:
                raise InvalidArgumentError(
                    f"{field}[{i}].extra_json", f"must not repeat the fields {', '.join(sorted(clash))}"
                )
        converted["role"] = message.role
        converted["content"] = message.content
        if message.images:
            converted["image"] = [
                ImagePart(data=img.data, mime_type=img.mime_type, source=img.source) for img in message.images
            ]
        result.append(converted)
    validate_message_sizes(result, limits, field)
    return result


def gen_args_from_proto(args: pb.GenerationArgs, limits: Limits = DEFAULT_LIMITS) -> GenArgs:
    temperature = args.temperature if args.HasField("temperature") else DEFAULT_TEMPERATURE
    # unset, it is the usual default, or the server's cap when that is lower
    max_tokens = args.max_tokens if args.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    return GenArgs(
        temperature=validate_temperature(temperature),
        max_tokens=validate_max_tokens(max_tokens, limits.max_tokens),
        extra=validate_extra_args(_json_object(args.extra_json, "args.extra_json", limits), limits),
    )


def generate_request_from_proto(
    request: pb.GenerateRequest | pb.GenerateStreamRequest, limits: Limits = DEFAULT_LIMITS
) -> tuple[Selector, list[Message], GenArgs]:
    """A Generate (or GenerateStream: same fields) request's selector, messages and arguments, each checked
    against ``limits``."""
    return (
        selector_from_proto(request.model, limits=limits),
        messages_from_proto(request.messages, limits=limits),
        gen_args_from_proto(request.args, limits),
    )


def batch_request_from_proto(
    request: pb.GenerateBatchRequest, limits: Limits = DEFAULT_LIMITS
) -> tuple[Selector, list[list[Message] | Exception], GenArgs]:
    """The batch's selector, its rows (each row's messages, or the error that its conversion met: that row's
    alone), and the arguments they share."""
    selector = selector_from_proto(request.model, limits=limits)
    args = gen_args_from_proto(request.args, limits)
    if not request.conversations:
        raise InvalidArgumentError("conversations", "must hold at least one conversation")
    rows: list[list[Message] | Exception] = []
    for i, conversation in enumerate(request.conversations):
        try:
            rows.append(messages_from_proto(conversation.messages, f"conversations[{i}].messages", limits=limits))
        except Exception as exc:
            rows.append(exc)
    return selector, rows, args


def batch_to_proto(
    outcomes: Sequence[tuple[ModelSpec, Generation] | BaseException], batch_id: str, redactor: Redactor
) -> pb.GenerateBatchResponse:
    """Each row's reply or its own status, with the row's request id (the batch's, then ``/index``)."""
    results = []
    for i, outcome in enumerate(outcomes):
        row_id = f"{batch_id}/{i}"
        if isinstance(outcome, BaseException):
            err = as_clemserve_error(outcome, row_id)
            results.append(pb.BatchResult(error=to_row_error(err, row_id, redactor)))
        else:
            results.append(pb.BatchResult(response=generation_to_proto(outcome[1], outcome[0], row_id)))
    return pb.GenerateBatchResponse(results=results, request_id=batch_id)


def lease_request_from_proto(request: pb.LeaseModelRequest, limits: Limits = DEFAULT_LIMITS) -> tuple[Selector, float]:
    """The selector and the lease's requested length (0: the server's lease timeout)."""
    requested = request.ttl_seconds
    if requested < 0 or requested != requested:
        raise InvalidArgumentError("ttl_seconds", f"must be 0 or a positive number of seconds, got {requested}")
    return selector_from_proto(request.model, limits=limits), requested


def resolved_to_proto(spec: ModelSpec, served: Provenance | None) -> pb.ResolveModelResponse:
    """The resolved entry, with where its answers come from when that was asked for."""
    if served is None:
        return pb.ResolveModelResponse(model_spec=spec_to_proto(spec))
    return pb.ResolveModelResponse(
        model_spec=spec_to_proto(spec),
        server_version=served.server_version,
        library_versions=served.library_versions,
        revision=served.revision,
        dtype=served.dtype,
        device=served.device,
        unpriced=served.unpriced,
        prefix_caching=served.prefix_caching,
    )


def spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(json=spec.to_string())


def generation_to_proto(generation: Generation, spec: ModelSpec, request_id: str) -> pb.GenerateResponse:
    """The reply, clembench's ``clem_player`` block stamped into the response object as clemcore's
    ``generate_response`` stamps it (the call's start and duration, the text, the model's name)."""
    if generation.call_start is not None:
        generation.response["clem_player"] = {
            "call_start": str(generation.call_start),
            "call_duration": str(generation.call_duration),
            "response": generation.text,
            "model_name": spec["model_name"],
        }
    reply = pb.GenerateResponse(
        prompt_json=_json_text(generation.prompt),
        response_json=_json_text(generation.response),
        response_text=generation.text,
        finish_reason=_FINISH_REASONS[generation.finish_reason],
        request_id=request_id,
    )
    # set in place: a sub-message passed to the constructor is built, then copied in
    usage = reply.usage
    usage.prompt_tokens, usage.completion_tokens = generation.prompt_tokens, generation.completion_tokens
    usage.cached_prompt_tokens, usage.reasoning_tokens = generation.cached_prompt_tokens, generation.reasoning_tokens
    if generation.cost is not None:
        cost, charged = reply.cost, generation.cost
        cost.usd, cost.unpriced, cost.price_source = charged.usd, charged.unpriced, charged.source
        cost.compute_seconds = charged.compute_seconds
    reply.model_spec.json = spec.to_string()
    return reply


def stream_item_to_proto(
    item: StreamEvent | tuple[ModelSpec, Generation], request_id: str
) -> pb.GenerateStreamResponse:
    """A streamed request's state or text, or its reply (the last message)."""
    if isinstance(item, tuple):
        spec, generation = item
        return pb.GenerateStreamResponse(reply=generation_to_proto(generation, spec, request_id))
    return stream_event_to_proto(item)


def stream_event_to_proto(event: StreamEvent) -> pb.GenerateStreamResponse:
    if isinstance(event, TextDelta):
        return pb.GenerateStreamResponse(delta=pb.TextDelta(text=event.text))
    return pb.GenerateStreamResponse(
        state=pb.StreamState(
            phase=pb.StreamPhase.Value(f"STREAM_PHASE_{event.phase.name}"),
            progress=event.progress,
            detail=event.detail,
            requests_ahead=event.requests_ahead,
        )
    )


def token_count_to_proto(count: TokenCount) -> pb.CountTokensResponse:
    return pb.CountTokensResponse(
        prompt_tokens=count.prompt_tokens, context_size=count.context_size, prompt=count.prompt
    )


def model_status_to_proto(model: ModelSnapshot) -> pb.ModelStatus:
    return pb.ModelStatus(
        model_spec=spec_to_proto(model.spec),
        state=pb.ModelState.Value(f"MODEL_STATE_{model.state.name}"),
        state_reason=model.reason,
        load_seconds=model.load_seconds,
        requests_in_flight=model.running,
        requests_queued=model.queued,
        leases=model.leases,
        estimated_memory_bytes=model.estimated_bytes,
        measured_memory_bytes=model.measured_bytes,
        estimated_weights_bytes=model.memory.estimated_weights_bytes,
        estimated_kv_cache_bytes=model.memory.estimated_kv_cache_bytes,
        estimate_source=model.memory.estimate_source,
        measured_by=model.memory.measured_by if model.state is ModelState.READY else "",
        rss_delta_bytes=model.memory.rss_delta_bytes if model.state is ModelState.READY else 0,
        charged_memory_bytes=model.charged_bytes,
        devices=[pb.DeviceShare(index=i, bytes=n) for i, n in model.memory.devices]
        if model.state is ModelState.READY
        else [],
        load_progress=model.progress,
        idle_seconds=model.idle_seconds,
        availability=_availability_to_proto(model),
        availability_detail=model.availability_detail,
        spend=_spend_to_proto(model.spend),
        prefix_caching=model.prefix.in_force,
        prefix_cache_bytes=model.prefix.bytes,
    )


def _spend_to_proto(spend: Spend) -> pb.ModelSpend:
    usage = pb.Usage(
        prompt_tokens=spend.prompt_tokens,
        completion_tokens=spend.completion_tokens,
        cached_prompt_tokens=spend.cached_prompt_tokens,
        reasoning_tokens=spend.reasoning_tokens,
    )
    return pb.ModelSpend(
        calls=spend.calls,
        usage=usage,
        cost_usd=spend.cost_usd,
        compute_seconds=spend.compute_seconds,
        unpriced_calls=spend.unpriced_calls,
        unpriced=spend.unpriced,
    )


def _availability_to_proto(model: ModelSnapshot) -> pb.ModelAvailability.ValueType:
    """A snapshot nobody looked at says nothing."""
    if model.availability is None:
        return pb.MODEL_AVAILABILITY_UNSPECIFIED
    return pb.ModelAvailability.Value(f"MODEL_AVAILABILITY_{model.availability.name}")


def cache_to_proto(cache: CacheSnapshot) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[model_status_to_proto(m) for m in cache.models],
        memory_budget_bytes=cache.budget_bytes,
        memory_used_bytes=cache.used_bytes,
        memory_kind=cache.memory_kind,
        devices=[_device_to_proto(d) for d in cache.devices],
        memory_source=cache.memory_source,
        kv_cache_tokens=cache.kv_cache_tokens,
    )


def _device_to_proto(device: GpuMemory) -> pb.DeviceBudget:
    """A GPU of the budget, with what this process holds there split into tensors, cache and the rest."""
    cache = max(0, device.reserved_bytes - device.allocated_bytes)
    context = max(0, device.process_bytes - device.reserved_bytes) if device.process_bytes else 0
    return pb.DeviceBudget(
        index=device.index,
        name=device.name,
        uuid=device.uuid,
        total_bytes=device.total_bytes,
        budget_bytes=device.budget_bytes,
        used_by_others_bytes=device.used_by_others_bytes,
        process_bytes=device.process_bytes,
        allocated_bytes=device.allocated_bytes,
        allocator_cache_bytes=cache,
        cuda_context_bytes=context,
    )


def lease_event_to_proto(event: LeaseEvent) -> pb.LeaseModelResponse:
    return pb.LeaseModelResponse(
        lease_id=event.lease_id,
        status=model_status_to_proto(event.model),
        expires_in_seconds=event.expires_in_seconds,
        expired=event.expired,
    )
