"""ChatTokenizer on the tiny model's tokenizer: clembench's cleaning order (prompt, strip, eos culled), the split
prefix, chain of thought, the context size and a tokenizer without a chat template."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clemserve.registry import ModelSpec
from clemserve.registry.errors import (
    FailedPreconditionError,
)
from clemserve.service.backends.chat import ChatTokenizer, context_size


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
