"""Safe loading: which selector fields a client may add to a registry entry."""

from __future__ import annotations

from typing import Any

import pytest

from clemserve.registry import ModelRegistry, ModelSpec
from clemserve.registry.errors import PermissionDeniedError
from clemserve.service.security.client_specs import check_selector, forbidden_field, introduced_paths, is_forbidden_key

HF = {
    "model_name": "llama",
    "backend": "huggingface_local",
    "huggingface_id": "meta/llama",
    "lookup_source": "/srv/registry.json",
    "model_config": {"eos_to_cull": "</s>", "custom_chat_template": "{{ m }}", "vllm_args": {"dtype": "half"}},
}
OPENAI = {"model_name": "gpt", "backend": "openai", "model_id": "gpt-4o", "model_config": {}}
ECHO = {"model_name": "echo", "backend": "echo"}
ENTRIES = [ModelSpec.from_dict(e) for e in (HF, OPENAI, ECHO)]


def test_introduced_paths_are_what_the_entry_lacks() -> None:
    selector = {"model_name": "llama", "temperature": 0.5, "model_config": {"eos_to_cull": "</s>", "a": {"b": 1}}}
    assert sorted(introduced_paths(selector, HF)) == ["model_config.a.b", "temperature"]
    assert list(introduced_paths({"model_name": "echo", "model_config": {}}, ECHO)) == ["model_config"]
    assert list(introduced_paths({"x": [1, {"y": 2}]}, {})) == ["x.0", "x.1.y"]
    assert list(introduced_paths({"x": [1, {"y": 2}]}, {"x": [1, {}]})) == ["x.1.y"]


@pytest.mark.parametrize(
    ("selector", "entry", "field"),
    [
        ({"model_name": "echo", "huggingface_id": "evil/model"}, ECHO, "huggingface_id"),
        ({"model_name": "echo", "base_url": "http://203.0.113.7"}, ECHO, "base_url"),
        ({"model_name": "echo", "model_id": "gpt-4-32k"}, ECHO, "model_id"),
        ({"model_name": "llama", "model_config": {"trust_remote_code": True}}, HF, "model_config.trust_remote_code"),
        ({"model_name": "llama", "trust_remote_code": True}, HF, "trust_remote_code"),
        ({"model_name": "llama", "model_config": {"peft_model": "/data/lora"}}, HF, "model_config.peft_model"),
        ({"model_name": "echo", "model_config": {"gguf": {"file": "x.gguf"}}}, ECHO, "model_config.gguf.file"),
        ({"model_name": "echo", "model_config": {"custom_chat_template": "{{ x }}"}}, ECHO,
         "model_config.custom_chat_template"),
        ({"model_name": "llama", "model_config": {"vllm_args": {"dtype": "half", "seed": 1}}}, HF,
         "model_config.vllm_args.seed"),
        ({"model_name": "echo", "model_config": {"vllm_args": {}}}, ECHO, "model_config.vllm_args"),
        ({"model_name": "echo", "model_config": {"cache_dir": "/data"}}, ECHO, "model_config.cache_dir"),
        ({"model_name": "echo", "tokenizer_path": "/etc"}, ECHO, "tokenizer_path"),
        ({"model_name": "echo", "weights-file": "a.bin"}, ECHO, "weights-file"),
        ({"model_name": "echo", "extra": {"Model_Folder": "x"}}, ECHO, "extra.Model_Folder"),
        ({"model_name": "echo", "backend": "echo", "model_config": {"x": [{"base_url": "u"}]}}, ECHO,
         "model_config.x.0.base_url"),
    ],
)  # fmt: skip
def test_forbidden_fields_are_named(selector: dict[str, Any], entry: dict[str, Any], field: str) -> None:
    assert forbidden_field(selector, entry) == field


@pytest.mark.parametrize(
    ("selector", "entry"),
    [
        # a resolved spec sent back in full: every loading field has the entry's value
        ({**HF, "temperature": 0.0}, HF),
        ({"model_name": "llama", "model_config": {"vllm_args": {"dtype": "half"}}}, HF),
        ({"model_name": "gpt", "model_id": "gpt-4o", "backend": "openai"}, OPENAI),
        # generation-related and narrowing fields
        ({"model_name": "echo", "temperature": 0.7, "max_tokens": 10, "model_config": {"eos_to_cull": "x"}}, ECHO),
        ({"model_name": "echo", "context_size": "64", "thinking_mode": True}, ECHO),
        # words that contain a path word without being one
        ({"model_name": "echo", "profile": "a", "pathological": 1, "model_config": {"filed": 1}}, ECHO),
    ],
)
def test_narrowing_is_allowed(selector: dict[str, Any], entry: dict[str, Any]) -> None:
    assert forbidden_field(selector, entry) is None


def test_is_forbidden_key() -> None:
    assert all(is_forbidden_key(k) for k in ("Backend", "base_url", "model_path", "data_dir", "hub_uri", "filename"))
    assert not any(is_forbidden_key(k) for k in ("model_name", "temperature", "eos_to_cull", "profile", "urlish"))


def test_check_selector_against_the_matching_entry() -> None:
    registry = ModelRegistry(ENTRIES)
    check_selector("llama", registry)  # a name adds nothing
    check_selector({"model_name": "llama", "temperature": 0.1}, registry)
    check_selector({"model_name": "unknown", "huggingface_id": "x"}, registry)  # no entry: NOT_FOUND elsewhere
    with pytest.raises(PermissionDeniedError) as caught:
        check_selector({"model_name": "echo", "huggingface_id": "evil/model"}, registry)
    assert caught.value.code == "PERMISSION_DENIED"
    assert caught.value.metadata == {"field": "model.spec.huggingface_id"}
    assert "model.spec.huggingface_id" in str(caught.value) and "--allow-client-specs" in str(caught.value)


def test_the_first_unifying_entry_decides() -> None:
    """Two entries of one name: picking the second by a value it has is narrowing; a value that the first
    entry lacks is added to the first entry, which the registry resolves to, so it is refused."""
    local = ModelSpec.from_dict({"model_name": "m", "backend": "echo"})
    remote = ModelSpec.from_dict({"model_name": "m", "backend": "openai", "model_id": "gpt-4o"})
    check_selector({"model_name": "m", "backend": "openai"}, [local, remote])
    check_selector({"model_name": "m", "backend": "openai", "model_id": "gpt-4o"}, [local, remote])
    assert ModelRegistry([local, remote]).resolve({"model_name": "m", "model_id": "gpt-4o"})["backend"] == "echo"
    with pytest.raises(PermissionDeniedError):
        check_selector({"model_name": "m", "model_id": "gpt-4o"}, [local, remote])
