"""What every backend shares: the remote retry pauses, the entry's config as a copy, a batch of one, word-by-word
streaming for the diagnostic backends, the missing-extra error and the generation threads' priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.service.backends.base import (
    BackendContext,
    BatchingBackend,
    Progress,
    RetryPolicy,
    RowDone,
    lower_thread_priority,
    missing_dependency,
    stream_words,
)
from clemserve.service.domain import GenArgs, Generation, Message, Outcome, Row, TokenCount


@pytest.mark.parametrize("retry", [0, 1, 2, 3, 10])
def test_a_pause_is_drawn_up_to_the_doubled_backoff_and_the_maximum(retry: int) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3.0)
    bound = min(3.0, 0.5 * 2**retry)
    pauses = [policy.delay(retry, None) for _ in range(200)]
    assert all(0 <= pause <= bound for pause in pauses)
    assert max(pauses) > bound / 2  # full jitter: not stuck at the low end


def test_retry_after_is_the_pause_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_delay_s=30.0)
    assert policy.delay(5, 2.5) == 2.5 and policy.delay(0, 0.0) == 0.0 and policy.delay(0, 90.0) == 30.0
    assert policy.delay(0, -1.0) <= policy.base_delay_s  # a negative Retry-After is ignored


class Rows(BatchingBackend):
    name = "rows"

    async def load(self, progress: Progress) -> None:
        pass

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        return TokenCount(0, 0)

    async def generate_rows(self, rows: Sequence[Row], args: GenArgs, done: RowDone | None = None) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for row in rows:
            text = row.messages[-1]["content"]
            if row.sink is not None:
                row.sink(text)
            outcomes.append(InvalidArgumentError("messages", "no") if text == "fail" else Generation({}, {}, text))
        return outcomes


def rows_backend(tmp_path: Path, **config: object) -> Rows:
    spec = ModelSpec.from_dict({"model_name": "r", "backend": "rows", "model_config": config})
    return Rows(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))


def test_a_batching_backend_generates_one_request_as_a_batch_of_one(tmp_path: Path) -> None:
    backend = rows_backend(tmp_path)
    pieces: list[str] = []
    done = asyncio.run(backend.generate([{"role": "user", "content": "hi"}], GenArgs(), pieces.append))
    assert done.text == "hi" and pieces == ["hi"] and backend.batches
    with pytest.raises(InvalidArgumentError):
        asyncio.run(backend.generate([{"role": "user", "content": "fail"}], GenArgs()))


def test_the_entry_names_the_model_and_its_config_is_a_copy(tmp_path: Path) -> None:
    backend = rows_backend(tmp_path, eos_to_cull="</s>")
    assert backend.model_name == "r" and backend.model_config == {"eos_to_cull": "</s>"}
    backend.model_config["eos_to_cull"] = "changed"
    assert backend.model_config == {"eos_to_cull": "</s>"}


def test_stream_words_keeps_the_spaces_and_sends_nothing_without_a_sink() -> None:
    pieces: list[str] = []
    stream_words("Hello  big\nworld ", pieces.append)
    assert pieces == ["Hello", "  big", "\nworld", " "] and "".join(pieces) == "Hello  big\nworld "
    stream_words("unheard", None)


def test_a_missing_package_names_the_extra_to_install() -> None:
    # clemserve is not on PyPI: a checkout's path, or the make target that builds what pip cannot
    err = missing_dependency("cohere", "remote", ModuleNotFoundError("No module named 'cohere'", name="cohere"))
    assert err.subject == "pip install '/path/to/clemserve[remote]'"
    assert str(err) == (
        "backend cohere needs the Python package cohere: install it with pip install '/path/to/clemserve[remote]'"
    )
    err = missing_dependency("vllm", "vllm", ModuleNotFoundError("No module named 'vllm'", name="vllm"))
    assert err.subject.startswith("make vllm-env in the clemserve checkout")
    assert "that is missing" in str(missing_dependency("x", "hf", ImportError("?")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux only")
def test_a_generation_thread_lowers_its_own_priority_only() -> None:
    seen: dict[str, int] = {}

    def thread() -> None:
        me = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, me)
        lower_thread_priority(0)
        seen["unchanged"] = os.getpriority(os.PRIO_PROCESS, me) - before
        lower_thread_priority(3)
        seen["lowered"] = os.getpriority(os.PRIO_PROCESS, me) - before

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert seen["unchanged"] == 0
    assert seen["lowered"] == min(3, 19 - main)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
