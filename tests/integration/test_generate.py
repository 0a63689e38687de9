"""Generation through the real server and client, on the tiny offline Llama."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

MESSAGES = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you?"},
    {"role": "user", "content": "Tell me the name of the capital of Australia."},
]


def tiny(client: Any, max_tokens: int = 24, temperature: float = 0.0) -> Any:
    model = client.get_model_for("tiny-llama")
    model.set_gen_args(temperature=temperature, max_tokens=max_tokens)
    return model


def test_triple_shapes_and_prompt_dict(client: Any) -> None:  # cases 34, 35, 38
    prompt, response, text = tiny(client).generate_response(MESSAGES)
    assert isinstance(prompt, dict) and isinstance(response, dict) and isinstance(text, str)
    assert set(prompt) == {"inputs", "max_new_tokens", "temperature"}
    assert prompt["max_new_tokens"] == 24 and prompt["temperature"] == 0.0
    # the rendered template holds every turn of the history, BOS included once
    for message in MESSAGES:
        assert message["content"] in prompt["inputs"]
    assert prompt["inputs"].startswith("<s><|user|>") and prompt["inputs"].count("<s>") == 1
    assert response["response"].startswith(prompt["inputs"])
    assert text != ""


def test_text_is_cleaned_in_clembench_order(client: Any) -> None:
    prompt, response, text = tiny(client).generate_response(MESSAGES)
    generated = response["response"].replace(prompt["inputs"], "").strip()
    # eos_to_cull "</s>" removes every match; nothing is stripped afterwards
    assert text == generated.replace("</s>", "")


def test_clem_player_block(client: Any) -> None:  # case 41
    model = tiny(client)
    _, response, text = model.generate_response(MESSAGES)
    block = response["clem_player"]
    assert set(block) == {"call_start", "call_duration", "response", "model_name"}
    assert block["response"] == text and block["model_name"] == "tiny-llama"
    datetime.fromisoformat(block["call_start"])
    hours, minutes, seconds = block["call_duration"].split(":")
    assert int(hours) == 0 and int(minutes) == 0 and float(seconds) >= 0


def test_greedy_is_deterministic_and_batch_matches_single(client: Any) -> None:  # cases 36, 39
    model = tiny(client)
    first = model.generate_response(MESSAGES)
    second = model.generate_response(MESSAGES)
    assert first[0] == second[0] and first[2] == second[2]
    other = [{"role": "user", "content": "What is the capital of France?"}]
    batch = model.generate_batch_response([MESSAGES, other])
    assert len(batch) == 2
    assert batch[0][2] == first[2]
    assert batch[1][2] == model.generate_response(other)[2]
    assert all(row[2] for row in batch)


def test_sampling_runs_five_times(client: Any) -> None:  # case 37
    model = tiny(client, temperature=1.0)
    texts = [model.generate_response(MESSAGES)[2] for _ in range(5)]
    assert all(isinstance(t, str) for t in texts)
    assert len(set(texts)) > 1, "temperature 1.0 should sample, not repeat one greedy answer"


def test_message_merging_matches_clembench(client: Any) -> None:  # section 4.2 on the wire
    model = tiny(client)
    doubled = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Initial Prompt"},
        {"role": "user", "content": "Turn 1"},
    ]
    prompt, _, _ = model.generate_response(doubled)
    assert "<|system|>" not in prompt["inputs"]
    assert "Initial Prompt\n\nTurn 1" in prompt["inputs"]


def test_usage_and_finish_reason_on_the_wire(server: Any) -> None:
    import grpc

    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ModelServiceStub(channel).Generate(
            pb.GenerateRequest(
                model=pb.ModelSelector(name="tiny-llama"),
                messages=[pb.Message(role="user", content="Hello!")],
                args=pb.GenerationArgs(max_tokens=5),
                request_id="usage-check",
            )
        )
    assert reply.request_id == "usage-check"
    assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= 5
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    if reply.finish_reason == pb.FINISH_REASON_LENGTH:
        assert reply.usage.completion_tokens == 5
    assert '"model_name":"tiny-llama"' in reply.model_spec.json


def test_context_error_carries_clembench_numbers(client: Any) -> None:
    model = tiny(client, max_tokens=600)
    with pytest.raises(client.ContextExceededError) as caught:
        model.generate_response(MESSAGES)
    err = caught.value
    count = model.count_tokens(MESSAGES)
    assert err.context_size == count.context_size == 512
    assert err.tokens_used == count.prompt_tokens + 600
    assert err.tokens_left == 512 - err.tokens_used < 0
    assert str(err) == f"Context token limit for tiny-llama exceeded {err.tokens_used}/512"
    assert err.request_id


def test_count_tokens_matches_prompt(client: Any) -> None:
    model = tiny(client)
    count = model.count_tokens(MESSAGES)
    prompt, _, _ = model.generate_response(MESSAGES)
    assert count.prompt == prompt["inputs"]
    assert count.prompt_tokens > len(MESSAGES)


def test_echo_model_and_dict_selector(client: Any) -> None:
    model = client.get_model_for({"model_name": "echo", "temperature": 0.5})
    assert model.model_spec["backend"] == "echo" and model.model_spec["temperature"] == 0.5
    prompt, response, text = model.generate_response([{"role": "user", "content": "ping 42"}])
    assert text == "ping 42" and response["response"] == "ping 42"
    assert prompt == [{"role": "user", "content": "ping 42"}]


def test_asyncio_twin(client: Any) -> None:
    import asyncio

    async def run() -> list[str]:
        model = await client.get_async_model_for("echo")
        rows = [[{"role": "user", "content": f"row {i}"}] for i in range(4)]
        results = await model.generate_batch_response(rows)
        return [r[2] for r in results]

    assert asyncio.run(run()) == [f"row {i}" for i in range(4)]


def test_model_surface_matches_clembench(client: Any) -> None:
    model = client.get_model_for("echo")
    assert model.name == "echo" and str(model) == "echo"
    assert model.temperature == 0.0 and model.max_tokens == 300
    model.set_gen_args(temperature=0.3)
    with pytest.raises(AssertionError, match="No 'max_tokens' in gen_args"):
        model.get_gen_arg("max_tokens")
    assert model == client.get_model_for("echo")
    with pytest.raises(TypeError):
        hash(model)
    for name, backend in (("mock", "_player_programmed"), ("human", "_player_human")):
        assert client.get_model_for(name).model_spec["backend"] == backend
