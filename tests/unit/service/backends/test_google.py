"""The google backend's reading of its key entry, in process: the entry's ``api_version`` and an entry without
``api_key``, read from a key.json as the server reads it. Nothing is loaded and nothing is sent; what a
caller gets over the wire (requests to the version model_config names, a missing entry) is in
tests/integration/remote/test_google.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import FailedPreconditionError, KeyRegistry, ModelSpec
from clemserve.service.backends.base import BackendContext
from clemserve.service.backends.google import API_VERSION, GoogleBackend

KEY = "sk-fake-0123456789abcdef"


def backend(tmp_path: Path, google: dict[str, Any], **model_config: Any) -> GoogleBackend:
    """The google backend of an entry with ``model_config``, the key file's google entry ``google``."""
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps({"google": google}))
    spec = ModelSpec.from_dict({"model_name": "gemini", "backend": "google", "model_config": model_config})
    return GoogleBackend(spec, BackendContext(KeyRegistry.from_json(key_file).with_environment({}), tmp_path))


def api_version(found: GoogleBackend) -> str:
    return found.api_version(found.read_key())


def test_the_key_entry_chooses_the_api_version(tmp_path: Path) -> None:
    assert api_version(backend(tmp_path, {"api_key": KEY, "api_version": "v1alpha"})) == "v1alpha"


def test_model_config_wins_over_the_key_entry(tmp_path: Path) -> None:
    assert api_version(backend(tmp_path, {"api_key": KEY, "api_version": "v1alpha"}, api_version="v1")) == "v1"


def test_without_either_the_version_is_clembenchs(tmp_path: Path) -> None:
    assert api_version(backend(tmp_path, {"api_key": KEY})) == API_VERSION == "v1beta"


@pytest.mark.parametrize("version", ["v1beta/../v1", "", 1, "latest"])
def test_a_malformed_version_in_the_key_entry_names_the_field(tmp_path: Path, version: object) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        api_version(backend(tmp_path, {"api_key": KEY, "api_version": version}))
    assert caught.value.subject == "key.json: google.api_version"
    assert "must be a Gemini API version" in str(caught.value) and repr(version) in str(caught.value)


def test_an_entry_without_api_key_names_the_entry(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        backend(tmp_path, {"base_url": "http://127.0.0.1:9"}).read_key()
    assert caught.value.subject == "key.json: google"
    assert "the key.json entry 'google' has no api_key" in str(caught.value)
