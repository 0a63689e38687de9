"""What the hub says of a repository before its download, and the estimate made from it, against a stand-in
hub on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.service.backends import estimate, hub
from clemserve.service.memory import Sizing
from tests.standin_hub import StandInHub, serve_as_hub
from tests.tiny_model import write_sparse_safetensors

REPO = "org/tiny"
#: a Llama shape: 2 layers, 2 KV heads of 32 dimensions, float32
CONFIG = {
    "model_type": "llama", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512, "torch_dtype": "float32",
}  # fmt: skip


def checkpoint(folder: Path) -> Path:
    """A repository as the hub holds one: config, tokenizer, safetensors weights and the PyTorch bin beside them."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text("{}")
    write_sparse_safetensors(folder / "model.safetensors", {"w": ("F32", [64, 1000])})
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 5000)
    return folder


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    with StandInHub() as served:
        served.add(REPO, checkpoint(tmp_path / "repo"))
        serve_as_hub(monkeypatch, served, tmp_path / "hf")
        monkeypatch.setattr(hub, "HUB", hub.Hub())  # no listing kept from another test
        yield served


def spec(**config: object) -> ModelSpec:
    return ModelSpec.from_dict(
        {"model_name": "m", "backend": "huggingface_local", "huggingface_id": REPO, "model_config": config}
    )


def test_a_model_not_in_the_cache_is_estimated_from_the_sizes_the_hub_lists(
    stand_in: StandInHub, tmp_path: Path
) -> None:
    found = estimate(spec(), Sizing(tmp_path, max_batch=1, kv_tokens=100))
    weights = (tmp_path / "repo" / "model.safetensors").stat().st_size
    assert found.source == "hub file sizes" and found.weights == weights  # not the bin beside it
    assert found.kv_per_token == 2 * 2 * 2 * 32 * 4 and found.kv_cache == 100 * found.kv_per_token
    assert found.context == 512
    # the metadata and config.json only: no weight is downloaded, nothing is written to the cache
    assert stand_in.resolved() == ["config.json"]
    assert not (tmp_path / "hf" / "hub").exists()


def test_a_quantised_model_is_estimated_from_the_hubs_config_at_its_bits(stand_in: StandInHub, tmp_path: Path) -> None:
    found = estimate(spec(load_in_4bit=True), Sizing(tmp_path))
    assert found.source == "hub config.json, linear layers at 4 bits"
    from clemserve.service.backends.footprint import config_bytes

    assert found.weights == config_bytes(CONFIG, 4, 4)


def test_the_hub_is_asked_once_per_repository_and_process(stand_in: StandInHub) -> None:
    first = hub.HUB.listing(REPO)
    asked = len(stand_in.requests)
    assert hub.HUB.listing(REPO) is first and len(stand_in.requests) == asked
    assert first.sizes["pytorch_model.bin"] == 5000 and first.config is not None


def test_offline_the_hub_is_not_asked(stand_in: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.estimate(spec(), Sizing(tmp_path)) is None
    assert estimate(spec(), Sizing(tmp_path)).total == 0  # not cached, no hub: nothing to go by
    assert stand_in.requests == []


def test_a_hub_that_does_not_answer_is_left_alone_for_a_while(stand_in: StandInHub, tmp_path: Path) -> None:
    now = [0.0]
    listings = hub.Hub(clock=lambda: now[0])
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(hub.HubUnreachableError, match="did not answer: "):
        listings.listing(REPO, endpoint=dead)
    with pytest.raises(hub.HubUnreachableError, match="did not answer a moment ago"):
        listings.listing(REPO, endpoint=stand_in.url)
    assert stand_in.requests == []
    now[0] += hub.RETRY_S
    assert listings.listing(REPO, endpoint=stand_in.url).sha == stand_in.repos[REPO].sha


def test_a_repository_the_hub_does_not_have_leaves_the_local_estimate(stand_in: StandInHub, tmp_path: Path) -> None:
    missing = ModelSpec.from_dict(
        {"model_name": "m", "backend": "huggingface_local", "huggingface_id": "org/none", "model_config": {}}
    )
    assert hub.estimate(missing, Sizing(tmp_path)) is None
    malformed = ModelSpec.from_dict(
        {"model_name": "m", "backend": "huggingface_local", "huggingface_id": "org/a/b", "model_config": {}}
    )
    assert hub.estimate(malformed, Sizing(tmp_path)) is None
    # a status from the hub is an answer, an id it cannot take no question: the hub is asked about others at once
    assert hub.HUB.listing(REPO).repo == REPO
