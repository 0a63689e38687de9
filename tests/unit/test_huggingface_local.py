"""The local backends' load-time checks and text cleaning (spec section 5.1), without a server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ContextExceededError, FailedPreconditionError, InvalidArgumentError
from clemserve.service.backends import BackendContext
from clemserve.service.backends.chat import ChatTokenizer, context_size
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.domain import GenArgs, Message, Row


def msg(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def backend(tmp_path: Path, **config: Any) -> HuggingfaceLocalBackend:
    spec = ModelSpec(
        model_name="m",
        backend="huggingface_local",
        huggingface_id="some/model",
        model_config={"premade_chat_template": True, "eos_to_cull": "</s>", **config},
    )
    return HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    return tok


def chat(tokenizer: Any, **config: Any) -> ChatTokenizer:
    return ChatTokenizer(tokenizer, {"premade_chat_template": True, "eos_to_cull": "</s>", **config}, "m")


def cleaned(tmp_path: Path, tokenizer: Any, output: str, prompt: str = "P", **config: Any) -> tuple[str, Any]:
    return chat(tokenizer, **config).clean(output, prompt, max_tokens=50)


def test_cleaning_order(tmp_path: Path, tokenizer: Any) -> None:
    # prompt removal and strip, then every eos match culled, with no strip afterwards
    assert cleaned(tmp_path, tokenizer, "P  Hello\n</s>\n</s>") == ("Hello\n\n", None)


def test_output_split_prefix_takes_the_last_part(tmp_path: Path, tokenizer: Any) -> None:
    text, _ = cleaned(tmp_path, tokenizer, "P a ANSWER: b ANSWER: c", output_split_prefix="ANSWER:")
    assert text == " c"
    text, _ = cleaned(tmp_path, tokenizer, "P no prefix here", output_split_prefix="ANSWER:")
    assert text == "no prefix here"  # absent prefix: left alone (clembench 2024 raised IndexError)


def test_pad_strings_go_only_when_they_touch_an_edge(tmp_path: Path, tokenizer: Any) -> None:
    never = chat(tokenizer, eos_to_cull="NEVER")
    assert never.clean("P</s>x</s>y", "P", 10)[0] == "xy"
    assert never.clean("P a</s>b c", "P", 10)[0] == "a</s>b c"


def test_unescaped_eos_is_a_regex_as_in_clembench(tmp_path: Path, tokenizer: Any) -> None:
    text, _ = cleaned(tmp_path, tokenizer, "P Hello <b> x<|im_end|>", eos_to_cull="<|im_end|>")
    assert text == "Hello b x||"  # "<", "im_end" and ">" are alternatives


def test_chain_of_thought_split(tmp_path: Path, tokenizer: Any) -> None:
    config = {"cot_output": True, "cot_start_tag": "<think>", "cot_end_tag": "</think>"}
    text, cot = cleaned(tmp_path, tokenizer, "P <think>plan it</think> The answer", **config)
    assert cot == "plan it" and text == "The answer"
    text, cot = cleaned(tmp_path, tokenizer, "P <think>never closed", **config)
    assert text == "" and cot == "never closed"


@pytest.mark.parametrize(
    ("config", "subject"),
    [
        ({"eos_to_cull": None}, "model_config.eos_to_cull"),
        ({"eos_to_cull": "(unclosed"}, "model_config.eos_to_cull"),
        ({"cot_output": True}, "model_config.cot_end_tag"),
        ({"multimodal": True}, "model_config.multimodal"),
        ({"chat_template_kwargs": "x"}, "model_config.chat_template_kwargs"),
    ],
)
def test_config_that_cannot_be_honoured_fails_at_load(tmp_path: Path, config: dict[str, Any], subject: str) -> None:
    b = backend(tmp_path, **config)
    with pytest.raises(FailedPreconditionError) as caught:
        b._check_config(b.model_config)
    assert caught.value.subject == subject


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    spec = ModelSpec(model_name="m", backend="huggingface_local", huggingface_id="x", model_config={})
    b = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "k.json"), tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        b._check_config(b.model_config)
    assert caught.value.subject == "model_config.premade_chat_template"


def test_unknown_config_keys_are_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = backend(tmp_path, shiny_new_flag=True)
    with caplog.at_level(logging.WARNING):
        b._check_config(b.model_config)
    assert "shiny_new_flag" in caplog.text


def test_context_size_order() -> None:
    spec = ModelSpec(model_name="m")
    tok = SimpleNamespace(model_max_length=2048)
    assert context_size(SimpleNamespace(max_position_embeddings=4096, n_positions=1), tok, spec) == 4096
    assert context_size(SimpleNamespace(n_positions=1024), tok, spec) == 1024
    nested = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=777))
    assert context_size(nested, tok, spec) == 777
    assert context_size(SimpleNamespace(), tok, spec) == 2048
    assert context_size(SimpleNamespace(), SimpleNamespace(model_max_length=10**30), spec) == 256
    assert context_size(SimpleNamespace(), tok, ModelSpec(model_name="m", context_size="128k")) == 131072


def test_a_tokenizer_without_template_is_refused(tokenizer: Any) -> None:
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(FailedPreconditionError) as caught:
        ChatTokenizer(bare, {"premade_chat_template": True, "eos_to_cull": "x"}, "m")
    assert caught.value.subject == "model_config.custom_chat_template"


def test_merged_rows_fail_on_their_own_and_answer_as_if_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    """One generate_rows call: a row with an image and one over the context get their own errors, the others
    exactly their answers alone (no padding in their texts), and a streamed row's pieces are its reply."""
    from tests.serving import hf_entry

    spec = ModelSpec(**hf_entry("m", tiny_model_dir))
    b = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    short, longer = msg("Hi"), msg("Tell me the name of the capital of Australia, please.")
    pieces: list[str] = []

    async def run() -> tuple[list[Any], list[Any]]:
        await b.load(lambda line, fraction=None: None)
        args = GenArgs(max_tokens=8)
        rows = [
            Row(short),
            Row([{"role": "user", "content": "look", "image": ["x.png"]}]),
            Row(msg("word " * 600)),
            Row(longer, sink=pieces.append),
        ]
        merged = await b.generate_rows(rows, args)
        alone = [(await b.generate_rows([Row(m)], args))[0] for m in (short, longer)]
        await b.unload()
        return merged, alone

    merged, alone = asyncio.run(run())
    assert isinstance(merged[1], InvalidArgumentError) and merged[1].field == "messages[0].image"
    assert isinstance(merged[2], ContextExceededError)
    for got, want in zip([merged[0], merged[3]], alone, strict=True):
        assert (got.prompt, got.response, got.text) == (want.prompt, want.response, want.text)
        assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == (
            want.prompt_tokens,
            want.completion_tokens,
            want.finish_reason,
        )
    assert pieces and merged[3].response["response"] == merged[3].prompt["inputs"] + "".join(pieces)
