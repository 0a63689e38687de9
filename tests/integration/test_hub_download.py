"""A model whose weights are only on the hub, through the real server and client, against a stand-in hub on
loopback (HF_ENDPOINT) and an empty Hugging Face cache: it is listed with an estimate from the hub's file
sizes before anything is downloaded; its first load downloads it with progress a streamed request sees.
(That --load-timeout counts from the download's end is tested on the loader, tests/unit/service/test_loading.py,
where a load's own time is short: here the first load imports torch.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import clemserve.client as backends
from clemserve.client import StreamReply, StreamState
from tests.serving import NO_PROVIDER_KEYS, ServerProcess, hf_entry, start_server
from tests.standin_hub import StandInHub

REPO = "clemserve-test/tiny-llama"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hub(tiny_model_dir: Path) -> Iterator[StandInHub]:
    """The tiny Llama in 16 KiB pieces 50 ms apart: about 1.6 s, which the server watches every 0.5 s."""
    with StandInHub(chunk=16384, delay_s=0.05) as served:
        served.add(REPO, tiny_model_dir)
        yield served


@pytest.fixture(scope="module")
def online_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, hub: StandInHub
) -> Iterator[ServerProcess]:
    """Online, its hub the stand-in, its Hugging Face cache empty."""
    folder = tmp_path_factory.mktemp("hub-download")
    entries = [{**hf_entry("hub-llama", tiny_model_dir), "huggingface_id": REPO}]
    registry = folder / "registry.json"
    registry.write_text(json.dumps(entries))
    env = {**NO_PROVIDER_KEYS, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(folder / "hf")}
    proc = start_server(folder, "--registry", str(registry), "--online", env=env, timeout=300)
    yield proc
    assert proc.stop() == 0, proc.log()


def test_a_model_not_downloaded_yet_is_estimated_from_the_hubs_file_sizes(
    online_server: ServerProcess, hub: StandInHub, tiny_model_dir: Path
) -> None:
    (status,) = [s for s in backends.list_models(address=online_server.address) if s.name == "hub-llama"]
    assert status.state == "not_loaded" and status.estimate_source == "hub file sizes", status
    assert status.estimated_weights_bytes == (tiny_model_dir / "model.safetensors").stat().st_size
    assert status.estimated_kv_cache_bytes > 0  # config.json read from the hub
    assert "model.safetensors" not in hub.resolved()  # nothing downloaded to estimate it


def test_a_first_load_downloads_with_progress_then_loads(online_server: ServerProcess, hub: StandInHub) -> None:
    model = backends.get_model_for("hub-llama", address=online_server.address, timeout=120)
    model.set_gen_args(temperature=0.0, max_tokens=8)
    events = list(model.generate_stream(HELLO))

    assert isinstance(events[-1], StreamReply) and events[-1].response_text.strip()
    loading = [e for e in events if isinstance(e, StreamState) and e.phase == "loading"]
    downloading = [e for e in loading if e.detail.startswith(f"downloading {REPO} from the Hugging Face hub: ")]
    assert any(0 < e.progress < 0.3 and " MiB of 0.5 MiB (" in e.detail for e in downloading), loading
    assert [e.progress for e in loading] == sorted(e.progress for e in loading)
    assert hub.resolved().count("model.safetensors") == 1

    log = online_server.log()
    assert re.search(rf"downloaded {REPO}: 0.5 MiB in [0-9.]+ s\n(.|\n)*loaded hub-llama in", log), log
