"""Key and KeyRegistry: spec section 6 and conformance cases 26-29, plus the environment layer."""

from __future__ import annotations

import json
import logging
import re
import stat
from pathlib import Path

import pytest

from clemserve.registry import FailedPreconditionError, Key, KeyFileError, KeyRegistry

LONG_KEY = "sk-abcdefghijklmnopqrstuvwxyz0123"
SHORT_KEY = "abcdef12"


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- case 26-28: Key -------------------------------------------------------------------------------------


def test_case26_fields_as_attributes_and_items() -> None:
    key = Key(api_key=LONG_KEY, organisation="org", base_url="https://example.invalid")
    assert key.api_key == LONG_KEY
    assert key["organisation"] == "org"
    assert key.base_url == "https://example.invalid"
    assert len(key) == 3
    assert list(key) == ["api_key", "organisation", "base_url"]
    assert key.get("missing") is None


def test_case26_api_key_defaults_to_none_and_missing_fields_raise() -> None:
    key = Key(organisation="org")
    assert key.api_key is None
    assert len(key) == 2
    with pytest.raises(KeyError):
        _ = key["base_url"]
    with pytest.raises(AttributeError):
        _ = key.base_url


def test_case26_key_is_read_only() -> None:
    key = Key(api_key=LONG_KEY)
    with pytest.raises(AttributeError):
        key.api_key = "other"
    assert key.api_key == LONG_KEY


@pytest.mark.parametrize("value", [None, "", "   ", 42])
def test_case27_has_api_key_is_false_without_a_non_blank_string(value: object) -> None:
    assert not Key(api_key=value).has_api_key()


def test_case27_has_api_key_is_true_for_a_key() -> None:
    assert Key(api_key="x").has_api_key()


def test_case28_masking_in_to_json() -> None:
    assert json.loads(Key(api_key=LONG_KEY).to_json())["api_key"] == "sk-a...0123"
    short = json.loads(Key(api_key=SHORT_KEY).to_json())["api_key"]
    assert short == "****12"
    assert "****" in short
    assert json.loads(Key().to_json())["api_key"] == "[MISSING]"
    assert json.loads(Key(api_key="  ").to_json())["api_key"] == "[MISSING]"
    assert json.loads(Key(api_key=LONG_KEY).to_json(mask_secrets=False))["api_key"] == LONG_KEY


def test_case28_to_json_is_sorted_with_indent_2() -> None:
    key = Key(organisation="org", api_key=LONG_KEY, base_url="u")
    expected = json.dumps({"api_key": "sk-a...0123", "base_url": "u", "organisation": "org"}, indent=2)
    assert key.to_json() == expected


def test_masked_shows_only_the_last_four_characters() -> None:
    assert Key(api_key=LONG_KEY).masked() == "…0123"
    assert Key(api_key="123456789").masked() == "…6789"
    assert Key(api_key=SHORT_KEY).masked() == "****"
    assert Key(api_key="ab").masked() == "****"
    assert Key().masked() == "[MISSING]"
    assert LONG_KEY[:4] not in Key(api_key=LONG_KEY).masked()


def test_repr_never_shows_the_raw_key() -> None:
    key = Key(api_key=LONG_KEY, token="other-secret-value")
    text = repr(key)
    assert LONG_KEY not in text
    assert LONG_KEY[:4] not in text
    assert "other-secret-value" not in text
    assert text == "Key(api_key=…0123, fields=[token])"
    assert str(key) == text


# -- case 29: KeyRegistry --------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "key.json",
        {"openai": {"api_key": LONG_KEY, "organisation": "org"}, "anthropic": {"api_key": SHORT_KEY}},
    )


def test_case29_len_get_iter_and_in(key_file: Path) -> None:
    registry = KeyRegistry.from_json(key_file)
    assert len(registry) == 2
    assert list(registry) == ["openai", "anthropic"]
    assert "openai" in registry
    assert "mistral" not in registry
    assert registry.get_key_for("openai").organisation == "org"
    assert registry.key_file_path == key_file


def test_case29_missing_entry_is_a_failed_precondition(key_file: Path) -> None:
    registry = KeyRegistry.from_json(key_file)
    with pytest.raises(FailedPreconditionError) as info:
        registry.get_key_for("mistral")
    assert str(info.value) == (
        f"the server has no key for mistral: add a `mistral` entry to the server's key.json (searched: {key_file})"
        " or set MISTRAL_API_KEY on the server"
    )
    assert info.value.subject == "key.json: mistral"


def test_missing_entry_names_every_file_searched_and_each_variable(tmp_path: Path) -> None:
    cwd, home = tmp_path / "work", tmp_path / "home"
    registry = KeyRegistry.from_json(cwd=cwd, home=home).with_environment({})
    searched = f"{cwd / 'key.json'}, {home / '.clemcore' / 'key.json'}"
    with pytest.raises(FailedPreconditionError) as info:
        registry.get_key_for("openai")
    assert str(info.value) == (
        f"the server has no key for openai: add an `openai` entry to the server's key.json (searched: {searched})"
        " or set OPENAI_API_KEY on the server"
    )
    with pytest.raises(FailedPreconditionError, match=r" or set GOOGLE_API_KEY or GEMINI_API_KEY on the server$"):
        registry.get_key_for("google")
    # an entry no variable fills names only the file
    with pytest.raises(FailedPreconditionError, match=r"entry to the server's key\.json \(searched: [^)]*\)$"):
        registry.get_key_for("my_provider")
    # a file found in the working directory ends the search there
    _write(cwd / "key.json", {"anthropic": {"api_key": SHORT_KEY}})
    found = KeyRegistry.from_json(cwd=cwd, home=home)
    assert found.searched == (cwd / "key.json",)
    with pytest.raises(FailedPreconditionError, match=rf"\(searched: {re.escape(str(cwd / 'key.json'))}\) or"):
        found.get_key_for("cohere")


def test_case29_set_new_update_and_reset(key_file: Path) -> None:
    registry = KeyRegistry.from_json(key_file)
    registry.set_key_for("mistral", {"api_key": "m-key"})
    assert registry.get_key_for("mistral").api_key == "m-key"
    registry.set_key_for("openai", {"base_url": "https://example.invalid"})
    updated = registry.get_key_for("openai")
    assert dict(updated) == {
        "api_key": LONG_KEY,
        "organisation": "org",
        "base_url": "https://example.invalid",
    }
    registry.set_key_for("openai", {"api_key": "new"}, reset=True)
    assert dict(registry.get_key_for("openai")) == {"api_key": "new"}


def test_case29_persist_then_reload(tmp_path: Path, key_file: Path) -> None:
    registry = KeyRegistry.from_json(key_file)
    registry.set_key_for("cohere", {"api_key": "c-key"})
    registry.persist()
    text = key_file.read_text(encoding="utf-8")
    assert text == json.dumps(
        {
            "anthropic": {"api_key": SHORT_KEY},
            "cohere": {"api_key": "c-key"},
            "openai": {"api_key": LONG_KEY, "organisation": "org"},
        },
        sort_keys=True,
        indent=2,
    )
    reloaded = KeyRegistry.from_json(key_file)
    assert sorted(reloaded) == ["anthropic", "cohere", "openai"]
    assert reloaded.get_key_for("cohere").api_key == "c-key"


def test_persist_creates_a_private_file(tmp_path: Path) -> None:
    target = tmp_path / "home" / ".clemcore" / "key.json"
    registry = KeyRegistry(target)
    registry.set_key_for("openai", {"api_key": LONG_KEY})
    registry.persist()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_case29_from_json_reads_the_cwd(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    _write(cwd / "key.json", {"openai": {"api_key": "from-cwd"}})
    registry = KeyRegistry.from_json(cwd=cwd, home=tmp_path / "home")
    assert registry.get_key_for("openai").api_key == "from-cwd"
    assert registry.key_file_path == cwd / "key.json"


def test_case29_no_file_without_fallback_is_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    _write(home / ".clemcore" / "key.json", {"openai": {"api_key": "from-home"}})
    with caplog.at_level(logging.WARNING, logger="clemserve.registry.keys"):
        registry = KeyRegistry.from_json(cwd=tmp_path / "cwd", home=home, fallback=False)
    assert len(registry) == 0
    assert registry.key_file_path == tmp_path / "cwd" / "key.json"
    assert "no usable key file" in caplog.text


def test_home_fallback_when_the_cwd_has_no_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home_file = _write(home / ".clemcore" / "key.json", {"openai": {"api_key": "from-home"}})
    registry = KeyRegistry.from_json(cwd=tmp_path / "cwd", home=home)
    assert registry.get_key_for("openai").api_key == "from-home"
    assert registry.key_file_path == home_file


def test_first_file_wins_whole_without_merging(tmp_path: Path) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    _write(cwd / "key.json", {"openai": {"api_key": "from-cwd"}})
    _write(home / ".clemcore" / "key.json", {"anthropic": {"api_key": "from-home"}})
    registry = KeyRegistry.from_json(cwd=cwd, home=home)
    assert list(registry) == ["openai"]


def test_broken_cwd_file_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    (cwd / "key.json").write_text('{"openai": {"api_key": "' + LONG_KEY, encoding="utf-8")
    _write(home / ".clemcore" / "key.json", {"anthropic": {"api_key": "from-home"}})
    with caplog.at_level(logging.DEBUG, logger="clemserve.registry.keys"):
        registry = KeyRegistry.from_json(cwd=cwd, home=home)
    assert list(registry) == ["anthropic"]
    assert str(cwd / "key.json") in caplog.text
    assert "invalid JSON" in caplog.text
    assert LONG_KEY not in caplog.text


def test_nothing_found_is_empty_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    with caplog.at_level(logging.WARNING, logger="clemserve.registry.keys"):
        registry = KeyRegistry.from_json(cwd=tmp_path / "cwd", home=home)
    assert len(registry) == 0
    assert registry.key_file_path == home / ".clemcore" / "key.json"
    assert "no usable key file" in caplog.text


# -- KeyFileError ----------------------------------------------------------------------------------------


def test_explicit_missing_file_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(KeyFileError) as info:
        KeyRegistry.from_json(missing)
    assert str(info.value) == f"{missing}: file not found"
    assert isinstance(info.value, ValueError)


def test_explicit_invalid_json_never_shows_the_content(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text('{"openai": {"api_key": "' + LONG_KEY + '" ', encoding="utf-8")
    with pytest.raises(KeyFileError) as info:
        KeyRegistry.from_json(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid JSON")
    assert LONG_KEY not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([{"api_key": LONG_KEY}], "expected a JSON object of key entries by name, got list"),
        ({"openai": LONG_KEY}, "entry 'openai' is not a JSON object"),
    ],
)
def test_explicit_file_of_the_wrong_shape(tmp_path: Path, data: object, problem: str) -> None:
    path = _write(tmp_path / "key.json", data)
    with pytest.raises(KeyFileError) as info:
        KeyRegistry.from_json(path)
    assert str(info.value) == f"{path}: {problem}"
    assert LONG_KEY not in str(info.value)


# -- environment layer -----------------------------------------------------------------------------------


def test_environment_fills_absent_entries(tmp_path: Path) -> None:
    registry = KeyRegistry(tmp_path / "key.json").with_environment(
        {
            "OPENAI_API_KEY": "env-openai",
            "OPENAI_ORGANIZATION": "env-org",
            "OPENAI_BASE_URL": "https://openai.invalid/v1",
            "ANTHROPIC_API_KEY": "env-anthropic",
            "MISTRAL_API_KEY": "env-mistral",
            "OPENROUTER_API_KEY": "env-openrouter",
            "OPENAI_COMPATIBLE_API_KEY": "env-compatible",
            "OPENAI_COMPATIBLE_BASE_URL": "http://localhost:8000/v1",
            "AZURE_GPT_API_KEY": "env-azure-gpt",
            "AZURE_GPT_BASE_URL": "https://gpt.azure.invalid",
            "AZURE_CLAUDE_API_KEY": "env-azure-claude",
            "AZURE_CLAUDE_BASE_URL": "https://claude.azure.invalid",
            "UNRELATED": "x",
        }
    )
    assert dict(registry.get_key_for("openai")) == {
        "api_key": "env-openai",
        "organisation": "env-org",
        "base_url": "https://openai.invalid/v1",
    }
    assert registry.get_key_for("anthropic").api_key == "env-anthropic"
    assert registry.get_key_for("mistral").api_key == "env-mistral"
    assert registry.get_key_for("openrouter").api_key == "env-openrouter"
    assert dict(registry.get_key_for("openai_compatible")) == {
        "api_key": "env-compatible",
        "base_url": "http://localhost:8000/v1",
    }
    assert registry.get_key_for("azure_gpt").base_url == "https://gpt.azure.invalid"
    assert registry.get_key_for("azure_claude").base_url == "https://claude.azure.invalid"
    assert "cohere" not in registry
    assert len(registry) == 7


@pytest.mark.parametrize(
    ("name", "environ", "expected"),
    [
        ("cohere", {"CO_API_KEY": "co"}, "co"),
        ("cohere", {"COHERE_API_KEY": "primary", "CO_API_KEY": "co"}, "primary"),
        ("google", {"GEMINI_API_KEY": "gemini"}, "gemini"),
        ("google", {"GOOGLE_API_KEY": "primary", "GEMINI_API_KEY": "gemini"}, "primary"),
        ("huggingface", {"HUGGING_FACE_HUB_TOKEN": "hub"}, "hub"),
        ("huggingface", {"HF_TOKEN": "primary", "HUGGING_FACE_HUB_TOKEN": "hub"}, "primary"),
        ("huggingface", {"HF_TOKEN": "  ", "HUGGING_FACE_HUB_TOKEN": "hub"}, "hub"),
    ],
)
def test_environment_alternative_variables(tmp_path: Path, name: str, environ: dict[str, str], expected: str) -> None:
    registry = KeyRegistry(tmp_path / "key.json").with_environment(environ)
    assert registry.get_key_for(name).api_key == expected


def test_environment_needs_a_non_blank_api_key(tmp_path: Path) -> None:
    registry = KeyRegistry(tmp_path / "key.json").with_environment(
        {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": "https://x.invalid", "ANTHROPIC_API_KEY": "  "}
    )
    assert len(registry) == 0


def test_file_entries_win_over_the_environment(key_file: Path) -> None:
    base = KeyRegistry.from_json(key_file)
    registry = base.with_environment({"OPENAI_API_KEY": "env-openai", "MISTRAL_API_KEY": "env-mistral"})
    assert registry.get_key_for("openai").api_key == LONG_KEY
    assert registry.get_key_for("mistral").api_key == "env-mistral"
    assert "mistral" not in base  # a new registry; the original is unchanged


def test_file_entry_without_api_key_still_wins(tmp_path: Path) -> None:
    path = _write(tmp_path / "key.json", {"openai_compatible": {"base_url": "http://localhost:1"}})
    registry = KeyRegistry.from_json(path).with_environment({"OPENAI_COMPATIBLE_API_KEY": "env"})
    assert registry.get_key_for("openai_compatible").api_key is None


def test_persist_leaves_environment_keys_out(key_file: Path) -> None:
    registry = KeyRegistry.from_json(key_file).with_environment({"MISTRAL_API_KEY": "env-mistral"})
    registry.persist()
    saved = json.loads(key_file.read_text(encoding="utf-8"))
    assert sorted(saved) == ["anthropic", "openai"]
    assert "env-mistral" not in key_file.read_text(encoding="utf-8")


def test_no_raw_key_is_ever_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "cwd" / "key.json", {"openai": {"api_key": LONG_KEY}})
    with caplog.at_level(logging.DEBUG, logger="clemserve.registry"):
        registry = KeyRegistry.from_json(cwd=path.parent, home=tmp_path / "home")
        registry = registry.with_environment({"ANTHROPIC_API_KEY": LONG_KEY + "-env"})
        registry.get_key_for("anthropic")
    assert caplog.records, "expected the environment key to be logged (masked)"
    assert LONG_KEY not in caplog.text
    assert "…-env" in caplog.text  # the masked form is what appears
    assert LONG_KEY[:8] not in caplog.text
