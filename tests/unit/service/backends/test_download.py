"""The download phase of a load, against a stand-in hub on loopback: the files a load reads, fetched into the
hub's cache with progress; a stalled download fails; a repository the hub cannot describe is left to the
backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service.backends import download, hub
from clemserve.service.backends.weights import cached_snapshot, transformers_files
from tests.standin_hub import StandInHub, serve_as_hub
from tests.unit.service.backends.test_hub import REPO, checkpoint


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """The weights come in 16 KiB pieces, 20 ms apart (about 0.3 s in all), watched every 20 ms."""
    with StandInHub(chunk=16384, delay_s=0.02) as served:
        served.add(REPO, checkpoint(tmp_path / "repo"))
        serve_as_hub(monkeypatch, served, tmp_path / "hf")
        monkeypatch.setattr(download, "POLL_S", 0.02)
        yield served


def fetch(reports: list[tuple[str, float]], stall_s: float = 5, repo: str = REPO) -> Path | None:
    report = lambda line, fraction: reports.append((line, fraction))  # noqa: E731
    return asyncio.run(download.fetch(repo, transformers_files, report, stall_s=stall_s, hub=hub.Hub()))


def test_a_download_fetches_what_the_load_reads_and_reports_its_bytes(stand_in: StandInHub, tmp_path: Path) -> None:
    reports: list[tuple[str, float]] = []
    snapshot = fetch(reports)

    assert snapshot is not None and snapshot.parent.parent.parent == tmp_path / "hf" / "hub"
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    weights = tmp_path / "repo" / "model.safetensors"
    assert (snapshot / "model.safetensors").read_bytes() == weights.read_bytes()
    assert "pytorch_model.bin" not in stand_in.resolved()
    assert cached_snapshot(REPO) == snapshot  # found offline from now on: the cache knows main's commit

    fractions = [fraction for _, fraction in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == download.SHARE
    assert any(0 < fraction < download.SHARE for fraction in fractions), reports  # seen on the way
    total = download.mib(sum(path.stat().st_size for path in snapshot.iterdir()))
    assert all(line.split(": ")[1].split(" of ")[1].startswith(total) for line, _ in reports[:-1]), reports
    assert reports[0][0].startswith(f"downloading {REPO} from the Hugging Face hub: 0.0 MiB of ")
    assert reports[-1][0].startswith(f"downloaded {REPO}: ")


def test_a_download_that_gains_no_byte_for_the_stall_timeout_fails_and_says_so(stand_in: StandInHub) -> None:
    stand_in.stall_after = 32768
    with pytest.raises(
        download.DownloadStalledError, match=r"stalled: no byte for 0\.3 s \(--download-stall-timeout\)"
    ):
        fetch([], stall_s=0.3)
    stand_in.release()


def test_a_repository_the_hub_does_not_have_is_left_to_the_backend(stand_in: StandInHub) -> None:
    reports: list[tuple[str, float]] = []
    assert fetch(reports, repo="org/none") is None
    assert reports == [] and stand_in.resolved() == []


def test_a_download_sends_the_servers_key_where_the_entry_requires_one(tmp_path: Path) -> None:
    keys = KeyRegistry(tmp_path / "key.json", {"huggingface": {"api_key": "hf_x"}})
    entry = {"model_name": "m", "backend": "huggingface_local", "huggingface_id": REPO}
    needs = ModelSpec.from_dict({**entry, "model_config": {"requires_api_key": True}})
    assert download.hub_token(needs, keys) == "hf_x"
    assert download.hub_token(ModelSpec.from_dict({**entry, "model_config": {}}), KeyRegistry(keys)) is None
