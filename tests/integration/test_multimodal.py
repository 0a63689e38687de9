"""Multimodal huggingface_local entries through the real server and client, against clemcore itself.

clemcore 3.7.2's HuggingfaceLocalMultimodalModel runs in a process of its own on the same tiny models and the
same image files, with this environment's torch and transformers (clemcore's own environment has neither):
its package directory is appended to ``sys.path`` after this environment's, and ``peft``, which its module
imports but its multimodal path never uses, is a stand-in. clembench loads vision-language models with
``AutoModelForCausalLM``, which knows Gemma 3 but not LLaVA; for LLaVA the clemcore side registers
``LlavaForConditionalGeneration`` with it, the class clemserve loads for LLaVA (``AutoModelForImageTextToText``).

That run does every comparison at once (both families, all conversations, the context error) while the one
server of the module starts. What it answered is kept in the test cache under a digest of everything it
depends on (its script, the models' files, the images, the conversations, the versions of clemcore, torch
and transformers), so that a later run with the same inputs compares against it without running it again.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import REPO, ServerProcess, hf_entry, start_server
from tests.tiny_vlm import draw_png, registry_entry, tiny_vlm, vlm_cache

MAX_TOKENS = 10
IN_PROCESS = r"""
import json, sys, types

sys.modules["peft"] = types.ModuleType("peft")
sys.modules["peft"].PeftModel = None
sys.path.append(sys.argv[1])
from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

AutoModelForCausalLM.register(LlavaConfig, LlavaForConditionalGeneration, exist_ok=True)
from clemcore.backends.huggingface_local_api import HuggingfaceLocal
from clemcore.backends.model_registry import ModelSpec
from clemcore.backends.utils import ContextExceededError

del sys.modules["peft"]  # transformers looks for peft by its module spec: it must find none

entries, conversations, max_tokens = json.loads(sys.argv[2])
out = {}
for entry in entries:
    model = HuggingfaceLocal().get_model_for(ModelSpec.from_dict(entry))
    model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    rows = []
    for messages in conversations:
        prompt, response, text = model.generate_response(messages)
        response.pop("clem_player")
        rows.append([prompt, response, text])
    model.set_gen_args(temperature=0.0, max_tokens=600)
    try:
        model.generate_response(conversations[0])
        error = None
    except ContextExceededError as exc:
        error = [str(exc), exc.tokens_used, exc.tokens_left, exc.context_size]
    out[entry["model_name"]] = {"rows": rows, "context": error}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def game_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The game's working directory with its image files (the client reads them, the server never does)."""
    folder = tmp_path_factory.mktemp("game")
    for seed in range(4):
        (folder / f"picture{seed}.png").write_bytes(draw_png(seed))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    return folder


def conversations(folder: Path) -> list[list[dict[str, Any]]]:
    data_url = "data:image/png;base64," + base64.b64encode((folder / "picture3.png").read_bytes()).decode()
    return [
        [{"role": "user", "content": "What is in this picture?", "image": [str(folder / "picture0.png")]}],
        [
            {"role": "user", "content": "Describe the image.", "image": str(folder / "picture1.png")},
            {"role": "assistant", "content": "A red square."},
            {
                "role": "user",
                "content": "Which image shows the cloud?",
                "image": [str(folder / "picture2.png"), data_url],
            },
        ],
        [{"role": "user", "content": "Hello! How can I help you?"}],
    ]


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    return {kind: tiny_vlm(kind, vlm_cache()) for kind in ("llava", "gemma3")}


@pytest.fixture(scope="module")
def entries(models: dict[str, Path]) -> list[dict[str, Any]]:
    return [registry_entry("tiny-llava", models["llava"]), registry_entry("tiny-gemma3", models["gemma3"])]


class ClemcoreRun:
    """clemcore's answers for ``entries`` and the conversations of ``game_dir``: kept ones, or a run of its own
    started at once (so that it overlaps the server's start) and kept once it has answered."""

    def __init__(self, site: Path, entries: list[dict[str, Any]], game_dir: Path) -> None:
        self.game_dir = game_dir
        args = json.dumps([entries, conversations(game_dir), MAX_TOKENS])
        self.kept = vlm_cache() / f"clemcore-{_digest(site, entries, game_dir)}.json"
        self.process: subprocess.Popen[str] | None = None
        if not self.kept.is_file():
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            self.process = subprocess.Popen(
                [sys.executable, "-c", IN_PROCESS, str(site), args],
                cwd=game_dir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

    def result(self) -> dict[str, Any]:
        if self.process is None:
            return dict(json.loads(self.kept.read_text()))
        stdout, stderr = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, stderr[-4000:]
        found = next(line for line in stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :]
        if str(self.game_dir) not in found:  # what holds a path of this run is not kept for the next
            partial = self.kept.with_name(f".{self.kept.name}-{os.getpid()}")
            partial.write_text(found)
            partial.replace(self.kept)
        return dict(json.loads(found))

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _digest(site: Path, entries: list[dict[str, Any]], game_dir: Path) -> str:
    """What clemcore's answers depend on: its script and version, torch's and transformers', the models' files,
    the conversations (the game folder's path left out: clemcore reads the files, whose bytes count)."""
    digest = hashlib.sha256(IN_PROCESS.encode())
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers")]
    clemcore = sorted(p.name for p in site.glob("clemcore-*.dist-info"))
    asked = json.dumps(conversations(game_dir)).replace(str(game_dir), "GAME")
    digest.update(json.dumps([versions, clemcore, MAX_TOKENS, asked]).encode())
    folders = [Path(entry["huggingface_id"]) for entry in entries]
    for path in [*(p for folder in folders for p in sorted(folder.iterdir())), *sorted(game_dir.iterdir())]:
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


@pytest.fixture(scope="module")
def in_process(entries: list[dict[str, Any]], game_dir: Path) -> Iterator[ClemcoreRun]:
    python = Path(os.environ.get("CLEMSERVE_CLEMCORE_PYTHON") or REPO / ".venv-clemcore" / "bin" / "python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not (Path(site) / "clemcore").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"no clemcore environment at {python}: make test builds it (make clemcore-env)")
        pytest.skip("no clemcore environment: run make clemcore-env")
    run = ClemcoreRun(Path(site), entries, game_dir)
    yield run
    run.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    entries: list[dict[str, Any]],
    models: dict[str, Path],
    tiny_model_dir: Path,
    in_process: ClemcoreRun,
) -> Iterator[ServerProcess]:
    gemma3 = models["gemma3"]
    registry = [
        *entries,
        registry_entry("tiny-gemma3-one-each", gemma3, multimodality={"single_image": True, "multiple_images": False}),
        registry_entry("tiny-gemma3-no-images", gemma3, multimodality=False),
        registry_entry("tiny-gemma3-never-loaded", gemma3),
        hf_entry("tiny-llama", tiny_model_dir),
    ]
    folder = tmp_path_factory.mktemp("multimodal-server")
    (folder / "registry.json").write_text(json.dumps(registry))
    proc = start_server(folder, "--registry", str(folder / "registry.json"), "--max-images", "4")
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def clemcore_result(in_process: ClemcoreRun, server: ServerProcess) -> dict[str, Any]:
    import clemserve.client as backends

    # the server loads its models while clemcore runs
    loading = threading.Thread(
        target=lambda: [backends.preload(name, address=server.address) for name in ("tiny-llava", "tiny-gemma3")]
    )
    loading.start()
    result = in_process.result()
    loading.join()
    return result


@pytest.fixture
def client(server: ServerProcess) -> Any:
    import clemserve.client as backends

    backends.connect(server.address)
    return backends


def model(client: Any, name: str, max_tokens: int = MAX_TOKENS) -> Any:
    found = client.get_model_for(name, lease=False)  # no lease stream left open for the server's stop to wait on
    found.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    return found


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-gemma3"])
def test_same_prompt_response_and_text_as_clemcore(
    client: Any, clemcore_result: dict[str, Any], game_dir: Path, name: str
) -> None:
    expected = clemcore_result[name]["rows"]
    served = model(client, name)
    for messages, (prompt, response, text) in zip(conversations(game_dir), expected, strict=True):
        got_prompt, got_response, got_text = served.generate_response(messages)
        assert got_response.pop("clem_player")["response"] == got_text
        assert (got_prompt, got_response, got_text) == (prompt, response, text)
    # the images are in the prompt: each image part became the family's image tokens
    with_images = expected[1][1]["response"]
    assert with_images.count("<image>" if name == "tiny-llava" else "<start_of_image>") >= 3


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-gemma3"])
def test_context_error_as_clemcore_raises_it(
    client: Any, clemcore_result: dict[str, Any], game_dir: Path, name: str
) -> None:
    message, used, left, size = clemcore_result[name]["context"]
    first = conversations(game_dir)[0]
    with pytest.raises(client.ContextExceededError) as caught:
        model(client, name, max_tokens=600).generate_response(first)
    assert (str(caught.value), caught.value.tokens_used, caught.value.tokens_left) == (message, used, left)
    assert caught.value.context_size == size
    # count_tokens counts what the check counts: the image tokens included
    count = model(client, name).count_tokens(first)
    assert (count.prompt_tokens + 600, count.context_size) == (used, size)
    assert count.prompt_tokens > model(client, name).count_tokens([{**first[0], "image": []}]).prompt_tokens


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-gemma3"])
def test_the_reply_depends_on_the_picture(client: Any, game_dir: Path, name: str) -> None:
    served = model(client, name)
    texts = {
        served.generate_response([{"role": "user", "content": "What is in this picture?", "image": [str(picture)]}])[2]
        for picture in sorted(game_dir.glob("picture*.png"))
    }
    assert len(texts) > 1, texts


def test_batch_rows_match_single_calls(client: Any, game_dir: Path) -> None:
    served = model(client, "tiny-gemma3")
    rows = conversations(game_dir)[:2]
    batch = served.generate_batch_response(rows)
    assert [(row[0], row[2]) for row in batch] == [
        (prompt, text) for prompt, _, text in (served.generate_response(row) for row in rows)
    ]


def test_streamed_text_is_the_reply(client: Any, game_dir: Path) -> None:
    served = model(client, "tiny-llava")
    messages = conversations(game_dir)[0]
    pieces = "".join(served.stream_text(messages))
    assert pieces.strip() == served.generate_response(messages)[2]


def test_image_limits_are_refused_naming_the_field(client: Any, game_dir: Path) -> None:
    two = [{"role": "user", "content": "Compare.", "image": [str(game_dir / "picture0.png")] * 2}]
    with pytest.raises(client.InvalidArgumentError) as one_each:
        model(client, "tiny-gemma3-one-each").generate_response(two)
    assert one_each.value.field == "messages[0].image" and "one image per message" in str(one_each.value)
    one = [{**two[0], "image": two[0]["image"][:1]}]
    assert "<start_of_image>" in model(client, "tiny-gemma3-one-each").generate_response(one)[1]["response"]

    with pytest.raises(client.InvalidArgumentError) as none:
        model(client, "tiny-gemma3-no-images").generate_response(two)
    assert none.value.field == "messages[0].image" and "does not accept images" in str(none.value)

    with pytest.raises(client.InvalidArgumentError) as text_model:
        model(client, "tiny-llama").generate_response(two)
    assert text_model.value.field == "messages[0].image" and "text model" in str(text_model.value)

    five = [{"role": "user", "content": "Compare.", "image": [str(game_dir / "picture1.png")] * 5}]
    with pytest.raises(client.InvalidArgumentError) as too_many:
        model(client, "tiny-llava").generate_response(five)
    assert too_many.value.field == "messages" and "at most 4" in str(too_many.value)

    broken = [{"role": "user", "content": "Look.", "image": [str(game_dir / "broken.png")]}]
    with pytest.raises(client.InvalidArgumentError) as unreadable:
        model(client, "tiny-llava").generate_response(broken)
    assert unreadable.value.field == "messages[0].image[0]"

    # the server keeps serving the model after each refusal
    assert "<image>" in model(client, "tiny-llava").generate_response(conversations(game_dir)[0])[1]["response"]


def test_listed_with_their_state(client: Any, game_dir: Path) -> None:
    model(client, "tiny-llava").generate_response(conversations(game_dir)[2])
    listed = {entry.name: entry for entry in client.list_models()}
    llava = listed["tiny-llava"]
    assert (llava.state, llava.availability) == ("ready", "ready"), llava
    # the estimate counts every tensor of the checkpoint: the vision tower and projector with the language model
    weights = sum(p.stat().st_size for p in vlm_cache().glob("tiny-llava-v2/*.safetensors"))
    assert weights * 0.9 < llava.estimated_memory_bytes, llava
    # one that has not loaded yet: found loadable, without loading it
    waiting = listed["tiny-gemma3-never-loaded"]
    assert (waiting.state, waiting.availability) == ("not_loaded", "can_load"), waiting
    assert waiting.estimated_memory_bytes > 0, waiting
