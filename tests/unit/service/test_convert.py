"""Property tests of request conversion and validation: any GenerateRequest either converts cleanly or is
refused with InvalidArgumentError naming a field the request has; nothing else escapes."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clemserve.registry import ensure_alternating_roles
from clemserve.registry.errors import InvalidArgumentError
from clemserve.service import convert
from clemserve.service.validation import Limits, validate_messages, validate_request_size
from clemserve.v1 import clemserve_pb2 as pb

LIMITS = Limits(
    request_bytes=2000,
    messages=6,
    message_chars=40,
    total_chars=120,
    max_tokens=100,
    images=3,
    image_bytes=16,
    total_image_bytes=40,
    json_depth=4,
)

# Each part is mostly well-formed, so that whole requests pass often enough to reach every rule.
_text = st.text(max_size=12)
_keys = st.sampled_from(["top_p", "top_k", "seed", "stop", "temperature", "max_tokens", "name", "image", "x"]) | _text
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _text
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3), max_leaves=10
)
# escapes JSON allows and UTF-8 does not, and numbers JSON lacks
_escapes = st.sampled_from(['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', "NaN", "-Infinity", "1e999"])


@st.composite
def _json_text(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        return ""
    if kind <= 6:
        return json.dumps(draw(st.dictionaries(_keys, _values, max_size=3)), allow_nan=True)
    if kind == 7:  # one escape or number that must be refused, or not (the pair)
        return "{" + json.dumps(draw(_keys)) + ": " + draw(_escapes) + "}"
    if kind == 8:  # nesting around the limit
        depth = draw(st.integers(1, 7))
        return '{"k": ' * depth + draw(_escapes | st.just("1")) + "}" * depth
    return draw(st.text(max_size=30))


def _mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 5).flatmap(lambda n: other if n == 0 else valid)


_roles = _mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["", "tool", "User"]) | _text)
_images = st.lists(
    st.builds(pb.Image, data=st.binary(max_size=20), mime_type=st.sampled_from(["", "image/png"])), max_size=2
)
_message = st.builds(
    pb.Message,
    role=_roles,
    content=_mostly(st.text(max_size=25), st.text(min_size=35, max_size=45)),
    images=_mostly(st.just([]), _images),
    extra_json=_json_text(),
)
_messages = _mostly(st.lists(_message, min_size=1, max_size=4), st.lists(_message, max_size=7))


@st.composite
def _args(draw: st.DrawFn) -> pb.GenerationArgs:
    args = pb.GenerationArgs(extra_json=draw(_json_text()))
    if draw(st.booleans()):
        args.temperature = draw(_mostly(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True)))
    if draw(st.booleans()):
        args.max_tokens = draw(_mostly(st.integers(1, 100), st.integers(min_value=-(2**63), max_value=2**63 - 1)))
    return args


@st.composite
def _selector(draw: st.DrawFn) -> pb.ModelSelector:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return pb.ModelSelector()
    if kind == 1:
        return pb.ModelSelector(name=draw(st.sampled_from(["echo", ""]) | _text))
    if kind <= 3:
        return pb.ModelSelector(spec=pb.ModelSpec(json=draw(_json_text())))
    return pb.ModelSelector(name="echo")


_requests = st.builds(
    pb.GenerateRequest,
    model=_selector(),
    messages=_messages,
    args=_args(),
    request_id=st.sampled_from(["", "r1"]),
)

_PATH = re.compile(r"(\w+)(?:\[(\d+)\])?")


def field_exists(request: pb.GenerateRequest, field: str) -> bool:
    """Whether ``field`` (``messages[2].extra_json``, ``args.top_p``, ``request``) names a part of ``request``."""
    if field == "request":
        return True
    node: Any = request
    for part in field.split("."):
        match = _PATH.fullmatch(part)
        if match is None:
            return False
        name, index = match.group(1), match.group(2)
        if isinstance(node, pb.GenerationArgs) and name not in pb.GenerationArgs.DESCRIPTOR.fields_by_name:
            return index is None and name in json.loads(node.extra_json or "{}")  # a generation argument
        if name not in node.DESCRIPTOR.fields_by_name:
            return False
        node = getattr(node, name)
        if index is not None:
            if int(index) >= len(node):
                return False
            node = node[int(index)]
    return True


def convert_and_validate(request: pb.GenerateRequest) -> tuple[Any, list[dict[str, Any]], Any]:
    """What the servicer and the manager do with a Generate request before resolving the model."""
    validate_request_size(request.ByteSize(), LIMITS)
    selector, messages, args = convert.generate_request_from_proto(request, LIMITS)
    validate_messages(messages)
    ensure_alternating_roles(messages)
    return selector, messages, args


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_requests)
def test_a_request_converts_or_names_an_existing_field(request: pb.GenerateRequest) -> None:
    try:
        selector, messages, args = convert_and_validate(request)
    except InvalidArgumentError as err:
        assert field_exists(request, err.field), err.field
        assert err.code == "INVALID_ARGUMENT"
        event(f"refused: {re.sub(r'[0-9]+', 'N', err.field)}")
        return
    event("converted")
    # what passes is within the limits and travels as UTF-8 JSON
    assert len(messages) == len(request.messages) <= LIMITS.messages
    assert all(len(m["content"]) <= LIMITS.message_chars for m in messages)
    assert sum(len(m["content"]) for m in messages) <= LIMITS.total_chars
    assert 1 <= args.max_tokens <= LIMITS.max_tokens
    assert 0.0 <= args.temperature <= 2.0 and math.isfinite(args.temperature)
    assert not {"temperature", "max_tokens"} & args.extra.keys()
    for value in (selector, args.extra, *({k: v for k, v in m.items() if k != "image"} for m in messages)):
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.text(max_size=50), st.lists(st.binary(max_size=20), max_size=3)),
        min_size=1,
        max_size=8,
    )
)
def test_size_limits_refuse_exactly_what_is_over_one(parts: list[tuple[str, list[bytes]]]) -> None:
    request = pb.GenerateRequest(
        model=pb.ModelSelector(name="echo"),
        messages=[
            pb.Message(role="user", content=content, images=[pb.Image(data=data) for data in images])
            for content, images in parts
        ],
    )
    images = [data for _, datas in parts for data in datas]
    over = (
        request.ByteSize() > LIMITS.request_bytes
        or len(parts) > LIMITS.messages
        or any(len(content) > LIMITS.message_chars for content, _ in parts)
        or sum(len(content) for content, _ in parts) > LIMITS.total_chars
        or len(images) > LIMITS.images
        or any(len(data) > LIMITS.image_bytes for data in images)
        or sum(len(data) for data in images) > LIMITS.total_image_bytes
    )
    try:
        convert_and_validate(request)
    except InvalidArgumentError as err:
        assert over, err
        assert field_exists(request, err.field), err.field
        event(f"refused: {re.sub(r'[0-9]+', 'N', err.field)}")
        return
    assert not over
    event("converted")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_and_validate_or_are_refused(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        request = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return
    try:
        convert_and_validate(request)
    except InvalidArgumentError as err:
        assert field_exists(request, err.field), err.field


def test_field_exists_knows_the_request() -> None:
    request = pb.GenerateRequest(
        messages=[pb.Message(role="user", images=[pb.Image()])], args=pb.GenerationArgs(extra_json='{"top_p": 1}')
    )
    assert field_exists(request, "messages[0].images[0]") and field_exists(request, "args.top_p")
    assert not field_exists(request, "messages[1].role") and not field_exists(request, "args.seed")
    assert not field_exists(request, "messages[0].image") and not field_exists(request, "model.spec.jsn")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_reply_json_is_what_json_dumps_writes(value: Any) -> None:
    """The reply's prompt and response objects are encoded by one reused C encoder: the same text as
    ``json.dumps(value, ensure_ascii=False)`` (NaN, infinities, non-ASCII and escapes included)."""
    assert convert._json_text(value) == json.dumps(value, ensure_ascii=False)


def test_reply_json_refuses_what_json_cannot_hold() -> None:
    try:
        convert._json_text({"response": object()})
    except TypeError as exc:
        assert "not JSON serializable" in str(exc)
    else:
        raise AssertionError("an object JSON cannot hold was encoded")


def test_reply_carries_usage_and_spec_even_when_zero() -> None:
    from clemserve.registry import ModelSpec
    from clemserve.service.domain import FinishReason, Generation

    spec = ModelSpec.from_dict({"model_name": "echo", "backend": "echo"})
    generation = Generation(
        prompt=[{"role": "user", "content": "é"}], response={"response": ""}, text="", prompt_tokens=0,
        completion_tokens=0, finish_reason=FinishReason.LENGTH,
    )  # fmt: skip
    reply = convert.generation_to_proto(generation, spec, "rid-1")
    assert reply.HasField("usage") and reply.HasField("model_spec")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (0, 0)
    assert json.loads(reply.model_spec.json) == spec.to_dict() and reply.model_spec.json == spec.to_string()
    assert (reply.prompt_json, reply.request_id) == ('[{"role": "user", "content": "é"}]', "rid-1")
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


def test_reply_carries_cached_and_reasoning_tokens_and_the_calls_cost() -> None:
    from clemserve.registry import ModelSpec
    from clemserve.service.domain import Cost, Generation

    spec = ModelSpec.from_dict({"model_name": "gpt", "backend": "openai"})
    generation = Generation({}, {}, "", 90, 30, cached_prompt_tokens=64, reasoning_tokens=20)
    generation.cost = Cost(usd=0.0125, source="genai-prices 0.2.5")
    reply = convert.generation_to_proto(generation, spec, "rid")
    assert (reply.usage.cached_prompt_tokens, reply.usage.reasoning_tokens) == (64, 20)
    assert (reply.cost.usd, reply.cost.price_source, reply.cost.unpriced) == (0.0125, "genai-prices 0.2.5", "")
    unpriced = Generation({}, {}, "", 1, 1, cost=Cost(unpriced="no price"))
    assert convert.generation_to_proto(unpriced, spec, "rid").cost.unpriced == "no price"


def test_model_status_carries_the_models_spend() -> None:
    from clemserve.registry import ModelSpec
    from clemserve.service.domain import ModelSnapshot, Spend

    spend = Spend(3, 300, 40, 64, 5, 0.5, 1.5, 1, "unknown model")
    status = convert.model_status_to_proto(ModelSnapshot(ModelSpec.from_dict({"model_name": "m"}), spend=spend))
    assert (status.spend.calls, status.spend.cost_usd, status.spend.compute_seconds) == (3, 0.5, 1.5)
    usage = status.spend.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens, usage.reasoning_tokens) == (
        300, 40, 64, 5
    )  # fmt: skip
    assert (status.spend.unpriced_calls, status.spend.unpriced) == (1, "unknown model")


def test_model_status_and_provenance_carry_the_models_prefix_reuse() -> None:
    from clemserve.registry import ModelSpec
    from clemserve.service.domain import ModelSnapshot, PrefixReuse
    from clemserve.service.provenance import Provenance

    spec = ModelSpec.from_dict({"model_name": "m"})
    status = convert.model_status_to_proto(ModelSnapshot(spec, prefix=PrefixReuse("prefix cache up to 1 MiB", 4096)))
    assert (status.prefix_caching, status.prefix_cache_bytes) == ("prefix cache up to 1 MiB", 4096)
    served = Provenance("1.0", prefix_caching="vllm automatic prefix caching")
    assert convert.resolved_to_proto(spec, served).prefix_caching == "vllm automatic prefix caching"
