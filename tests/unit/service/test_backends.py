"""The backend catalog: one entry per backend, asked instead of testing names."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.registry.errors import FailedPreconditionError
from clemserve.service import backends
from clemserve.service.backends import Backend, Memory
from clemserve.service.memory import Sizing


def spec(backend: str, **fields: object) -> ModelSpec:
    return ModelSpec(model_name="m", backend=backend, **{"model_config": {}, **fields})  # type: ignore[arg-type]


def test_every_entry_names_classes_that_exist_and_ends_with_a_default_route() -> None:
    for name in backends.served_backends():
        entry = backends.catalog(name)
        assert entry.name == name and entry.routes[-1].when is None
        for route in entry.routes:
            module, _, cls = route.target.partition(":")
            found = getattr(importlib.import_module(f"clemserve.service.backends.{module}"), cls)
            assert issubclass(found, Backend) and found.name == name
        for function in (entry.estimate, entry.weights):
            if function:
                module, _, attribute = function.partition(":")
                assert callable(getattr(importlib.import_module(f"clemserve.service.backends.{module}"), attribute))


def test_an_entry_picks_its_class_and_key_by_route() -> None:
    from clemserve.service.backends.azure import AzureClaudeBackend, AzureGPTBackend
    from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
    from clemserve.service.backends.huggingface_multimodal import HuggingfaceMultimodalBackend

    claude, gpt = spec("azure", model_id="Claude-Sonnet"), spec("azure", model_id="gpt-4o")
    assert (backends.backend_for(claude), backends.key_entry(claude)) == (AzureClaudeBackend, "azure_claude")
    assert (backends.backend_for(gpt), backends.key_entry(gpt)) == (AzureGPTBackend, "azure_gpt")
    assert backends.backend_for(spec("huggingface_local", model_config={"multimodal": True})) is (
        HuggingfaceMultimodalBackend
    )
    assert backends.backend_for(spec("huggingface_local")) is HuggingfaceLocalBackend
    assert backends.key_entry(spec("huggingface_local")) == "" and backends.key_entry(spec("cohere")) == "cohere"


def test_where_each_kind_of_backend_keeps_its_model() -> None:
    assert backends.memory_of(spec("huggingface_local")) is Memory.PROCESS
    assert Memory.PROCESS.on_gpus and Memory.PROCESS.read_through_ram
    assert Memory.ENGINE.on_gpus and not Memory.ENGINE.read_through_ram
    assert not Memory.MAPPED.on_gpus and not Memory.NONE.on_gpus
    assert backends.memory_of(spec("openai")) is Memory.NONE
    assert backends.memory_of(spec("no-such-backend")) is Memory.NONE


def test_backends_not_served_say_why() -> None:
    with pytest.raises(FailedPreconditionError, match="backend slurk is not served: its player is a person"):
        backends.catalog("slurk")
    with pytest.raises(FailedPreconditionError, match="unknown backend 'nope'; available: anthropic, azure"):
        backends.requirements("nope")


def test_a_declared_size_overrides_the_estimate_and_unreadable_files_estimate_nothing(tmp_path: Path) -> None:
    declared = spec("huggingface_local", huggingface_id=str(tmp_path), model_config={"memory_bytes": 4096})
    assert backends.estimate(declared, Sizing(tmp_path)).total == 4096
    assert backends.estimate(spec("huggingface_local", huggingface_id=str(tmp_path)), Sizing(tmp_path)).total == 0
    assert backends.estimate(spec("echo"), Sizing(tmp_path)).source == "none"
    assert backends.locate_weights(spec("openai")) is None
    found = backends.locate_weights(spec("vllm", huggingface_id=str(tmp_path)))
    assert found is not None and found.local and found.folder == tmp_path


@pytest.mark.parametrize(
    "name",
    ["../evil", "evil", "os:system", "clemserve.service.backends.echo:EchoBackend", "/data/evil.py", "__import__"],
)
def test_backend_code_comes_from_the_fixed_map_only(name: str) -> None:
    before = set(sys.modules)
    with pytest.raises(FailedPreconditionError) as caught:
        backends.backend_class(name)
    assert "unknown backend" in str(caught.value)
    assert set(sys.modules) == before  # nothing imported


#: the backends that send every generation argument on (OpenAI's API) or check them themselves (vLLM)
PASSES_EVERY_ARGUMENT = {"OpenAIBackend", "OpenAICompatibleBackend", "VLLMBackend"}


def test_generation_arguments_a_backend_cannot_honour_are_refused_before_queueing() -> None:
    from types import SimpleNamespace

    from clemserve.registry.errors import InvalidArgumentError
    from clemserve.service.domain import GenArgs

    for name in backends.served_backends():
        for route in backends.catalog(name).routes:
            module, _, class_name = route.target.partition(":")
            cls = getattr(importlib.import_module(f"clemserve.service.backends.{module}"), class_name)
            stand_in = SimpleNamespace(supported_args=cls.supported_args, name=cls.name)
            if class_name in PASSES_EVERY_ARGUMENT:
                cls.check_args(stand_in, GenArgs(extra={"no_such_arg": 1}))
                continue
            with pytest.raises(InvalidArgumentError) as caught:
                cls.check_args(stand_in, GenArgs(extra={"no_such_arg": 1}))
            assert caught.value.field == "args.no_such_arg", class_name
            cls.check_args(stand_in, GenArgs(extra=dict.fromkeys(cls.supported_args, 1)))
