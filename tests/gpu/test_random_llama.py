"""The random Llamas are built once per folder and reused (no CUDA needed: this runs in every suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu import random_llama


def test_a_model_is_built_once_and_reused_until_its_builder_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = random_llama.random_llama(tmp_path, "tiny", "float32")
    assert (built / "config.json").is_file() and list(built.glob("*.safetensors"))

    def no_second_build(folder: Path, *args: object) -> Path:
        folder.mkdir(parents=True)  # half built
        raise AssertionError("built again")

    monkeypatch.setattr(random_llama, "build_random_llama", no_second_build)
    assert random_llama.random_llama(tmp_path, "tiny", "float32") == built
    # another dtype, or another shape under the same name, is another model
    with pytest.raises(AssertionError, match="built again"):
        random_llama.random_llama(tmp_path, "tiny", "bfloat16")
    monkeypatch.setitem(random_llama.SHAPES, "tiny", random_llama.Shape(32, 64, 1, 2, 2, 256))
    with pytest.raises(AssertionError, match="built again"):
        random_llama.random_llama(tmp_path, "tiny", "float32")
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no half-built folder left behind
