"""openai_compatible against a real OpenAI-compatible server: vLLM's own, serving the tiny offline model.

The same conversations through clemserve's openai_compatible backend (forwarding to vLLM) and through its
huggingface_local backend (the same weights in-process) give the same greedy text.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import REPO, ServerProcess, free_port, hf_entry, start_server

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
        {"role": "user", "content": "Tell me the name of the capital of Australia."},
    ],
    [{"role": "system", "content": "You are playing a game."}, {"role": "user", "content": "Guess the word."}],
]


def vllm_python() -> Path:
    python = Path(os.environ.get("CLEMSERVE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no vLLM environment at {python}: make test builds it (make vllm-env)")
        pytest.skip("no vLLM environment: run make vllm-env")
    return python


@pytest.fixture(scope="module")
def vllm_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = vllm_python()
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
        "--served-model-name", "tiny-vllm",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM not ready after 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, vllm_url: str) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("compat")
    registry = folder / "registry.json"
    registry.write_text(
        json.dumps(
            [
                hf_entry("tiny-local", tiny_model_dir),
                {
                    "model_name": "tiny-remote",
                    "backend": "openai_compatible",
                    "model_id": "tiny-vllm",
                    # huggingface_local keeps special tokens in the text (clembench since 2025-08); so must vLLM
                    "model_config": {"extra_body": {"skip_special_tokens": False}},
                },
            ]
        )
    )
    keys = folder / "key.json"
    keys.write_text(json.dumps({"openai_compatible": {"api_key": "sk-vllm-local-9XqT2", "base_url": f"{vllm_url}/v1"}}))
    proc = start_server(folder, "--registry", str(registry), "--key-file", str(keys))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_greedy_text_through_vllm_and_in_process(both: ServerProcess, messages: list[dict[str, Any]]) -> None:
    import clemserve.client as backends

    texts = []
    for name in ("tiny-local", "tiny-remote"):
        model = backends.get_model_for(name, address=both.address, timeout=120)
        model.set_gen_args(temperature=0.0, max_tokens=12)
        prompt, response, text = model.generate_response(messages)
        texts.append(text)
        if name == "tiny-remote":
            assert prompt == messages  # openai_compatible's prompt is the message list it sent
            assert response["choices"][0]["message"]["role"] == "assistant"
            assert response["usage"]["completion_tokens"] <= 12
            assert response["clem_player"]["response"] == text
    assert texts[0] == texts[1]
    assert texts[0]


def test_vllm_context_error_is_the_structured_context_error(both: ServerProcess) -> None:
    import clemserve.client as backends

    model = backends.get_model_for("tiny-remote", address=both.address, timeout=120)
    model.set_gen_args(temperature=0.0, max_tokens=600)
    with pytest.raises(backends.ContextExceededError) as caught:
        model.generate_response(CONVERSATIONS[0])
    assert caught.value.context_size == 512
    assert caught.value.tokens_used > 512 and caught.value.tokens_left < 0
