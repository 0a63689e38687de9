"""Coverage-guided fuzzing of the request decoding and validation path, with atheris (libFuzzer).

    python tests/fuzz/fuzz_requests.py -max_total_time=60 [CORPUS_DIR ...]     # make fuzz

Each input is the bytes of a ``GenerateRequest`` as they arrive on the wire. A DecodeError is fine. A request
that decodes goes through the server's conversion and validation (``convert.generate_request_from_proto``,
``validate_messages``, clembench's message merging), where only ``InvalidArgumentError`` may escape; then
through the servicer's ``Generate`` in this process, on the echo backend, with a fake context, where every
status but INTERNAL and UNKNOWN is fine. Anything else is a crash: libFuzzer stops and writes the input.

Mutations are structure-aware (``mutate``): most decode the request, let libFuzzer mutate one field's
text (a JSON document, a role, a name), a number or the list of messages, and encode it again, so that
inputs reach past the decoder; the rest mutate the wire bytes. Without a corpus directory the run starts
from a few well-formed requests (``SEEDS``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["clemserve"]):
    import grpc
    from google.protobuf.message import DecodeError

    from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec, ensure_alternating_roles
    from clemserve.registry.errors import InvalidArgumentError
    from clemserve.service import convert
    from clemserve.service.backends import BackendContext
    from clemserve.service.model_cache import ModelCache
    from clemserve.service.servicer import ModelServicer
    from clemserve.service.validation import Limits, validate_messages, validate_request_size
    from clemserve.v1 import clemserve_pb2 as pb

#: small limits, so that the fuzzer reaches each of them
LIMITS = Limits(
    request_bytes=4096,
    messages=8,
    message_chars=512,
    total_chars=1024,
    max_tokens=64,
    images=2,
    image_bytes=64,
    total_image_bytes=96,
    json_depth=4,
)
REFUSED = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _seeds() -> list[bytes]:
    user = pb.Message(role="user", content="hello there")
    requests = [
        pb.GenerateRequest(model=pb.ModelSelector(name="echo"), messages=[user]),
        pb.GenerateRequest(
            model=pb.ModelSelector(name="echo-small"),
            messages=[pb.Message(role="system", content=""), user, pb.Message(role="assistant", content="hi")],
            args=pb.GenerationArgs(temperature=0.5, max_tokens=8, extra_json='{"top_p": 0.9, "stop": ["x"]}'),
        ),
        pb.GenerateRequest(
            model=pb.ModelSelector(spec=pb.ModelSpec(json='{"model_name": "echo", "model_config": {"a": [1]}}')),
            messages=[pb.Message(role="user", content="x", extra_json='{"name": "a", "meta": {"k": "\\u00e9"}}')],
            request_id="seed-3",
        ),
        pb.GenerateRequest(
            model=pb.ModelSelector(name="echo"),
            messages=[
                pb.Message(role="user", content="look", images=[pb.Image(data=b"\x89PNG", mime_type="image/png")])
            ],
        ),
    ]
    return [r.SerializeToString() for r in requests]


SEEDS = _seeds()


class FakeContext:
    """What the servicer's ``rpc`` wrapper asks of a grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.code, self.details = code, details
        raise _Aborted


class _Aborted(Exception):
    pass


def _servicer() -> ModelServicer:
    registry = ModelRegistry(
        [
            ModelSpec.from_dict({"model_name": "echo", "backend": "echo", "lookup_source": "fuzz"}),
            ModelSpec.from_dict(
                {"model_name": "echo-small", "backend": "echo", "context_size": "64", "lookup_source": "fuzz"}
            ),
        ]
    )
    context = BackendContext(
        keys=KeyRegistry(Path("key.json")), cache_dir=Path(tempfile.gettempdir()) / "clemserve-fuzz"
    )
    return ModelServicer(ModelCache(registry, context), LIMITS)


SERVICER = _servicer()
LOOP = asyncio.new_event_loop()


def check_conversion(request: pb.GenerateRequest) -> None:
    """The conversion and validation path: converts cleanly or raises InvalidArgumentError, nothing else."""
    try:
        validate_request_size(request.ByteSize(), LIMITS)
        _, messages, _ = convert.generate_request_from_proto(request, LIMITS)
        validate_messages(messages)
        ensure_alternating_roles(messages)
    except InvalidArgumentError:
        pass


def check_servicer(request: pb.GenerateRequest) -> None:
    """The servicer's Generate, in process: any status but INTERNAL or UNKNOWN."""
    context = FakeContext()
    try:
        reply = LOOP.run_until_complete(SERVICER.Generate(request, context))  # type: ignore[arg-type]
    except _Aborted:
        if context.code in REFUSED:
            raise AssertionError(f"Generate answered {context.code}: {context.details}") from None
        return
    reply.SerializeToString()  # the reply must travel: valid UTF-8 in every string


_NUMBERS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 2.0, 2.0000001, -1.0, 1e308)
_INTEGERS = (0, 1, -1, LIMITS.max_tokens, LIMITS.max_tokens + 1, 2**31, 2**63 - 1, -(2**63))


def _text_fields(request: pb.GenerateRequest) -> list[tuple[Any, str]]:
    """(message, field name) of every string in the request that a caller controls."""
    fields: list[tuple[Any, str]] = [(request, "request_id"), (request.args, "extra_json")]
    fields.append((request.model.spec, "json") if request.model.HasField("spec") else (request.model, "name"))
    for message in request.messages:
        fields += [(message, "role"), (message, "content"), (message, "extra_json")]
        fields += [(image, name) for image in message.images for name in ("data", "mime_type", "source")]
    return fields


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations applied inside a decoded request, or to the raw bytes (a fifth of the time)."""
    rng = random.Random(seed)
    try:
        request = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return atheris.Mutate(data, max_size)
    choice = rng.random()
    if choice < 0.2:
        return atheris.Mutate(data, max_size)
    if choice < 0.3:
        request.args.temperature = rng.choice(_NUMBERS) if rng.random() < 0.7 else rng.uniform(-1, 3)
    elif choice < 0.4:
        request.args.max_tokens = rng.choice(_INTEGERS)
    elif choice < 0.5:
        if request.messages and rng.random() < 0.5:
            del request.messages[rng.randrange(len(request.messages))]
        else:
            request.messages.append(pb.Message(role=rng.choice(("user", "assistant", "system")), content="x"))
            if rng.random() < 0.3:
                request.messages[-1].images.append(pb.Image(data=bytes(rng.randrange(256) for _ in range(40))))
    else:
        target, name = rng.choice(_text_fields(request))
        value = getattr(target, name)
        raw = value if isinstance(value, bytes) else value.encode()
        mutated = atheris.Mutate(raw, max(2 * len(raw), 64))
        setattr(target, name, mutated if isinstance(value, bytes) else mutated.decode(errors="replace"))
    out = request.SerializeToString()
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def test_one_input(data: bytes) -> None:
    try:
        request = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return
    check_conversion(request)
    check_servicer(request)


def main(argv: list[str]) -> None:
    logging.disable(logging.CRITICAL)  # the servicer logs every refusal; libFuzzer's own output is enough
    corpus = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not corpus:
        corpus = [tempfile.mkdtemp(prefix="clemserve-fuzz-corpus-")]
        argv = [*argv, *corpus]
    for i, seed in enumerate(SEEDS):  # the seeds join the corpus that libFuzzer grows and keeps
        (Path(corpus[0]) / f"seed-{i}").write_bytes(seed)
    atheris.Setup(argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
