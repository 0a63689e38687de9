"""The README's Quick start, run as it is written: its second terminal's commands, read from README.md, in a new
shell (nothing of clemserve on PATH) in this checkout, against a real server with the demo model. Only the
address changes: the test's server listens on a free port instead of ``make serve``'s 127.0.0.1:50051."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.serving import DEMO_CACHE, REPO, ServerPool, ServerProcess

pytestmark = pytest.mark.demo

GAMES = REPO.parent / "shared" / "clembench-games"
#: what make serve listens on (the Makefile's HOST and PORT), as the Quick start writes it
SERVE_ADDRESS = "127.0.0.1:50051"
#: a new shell: the system's tools, no virtual environment
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"


def quick_start() -> tuple[str, str]:
    """The Quick start's two blocks: the server's terminal, the second terminal."""
    section = (REPO / "README.md").read_text().split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def test_the_servers_terminal_is_make_serve_on_the_address_the_commands_use() -> None:
    serve, commands = quick_start()
    assert [line.split("#")[0].strip() for line in serve.strip().splitlines()] == ["make serve"]
    makefile = (REPO / "Makefile").read_text()
    host, port = SERVE_ADDRESS.split(":")
    assert f"\nHOST ?= {host}\n" in makefile and f"\nPORT ?= {port}\n" in makefile
    assert SERVE_ADDRESS in commands


def test_make_serve_is_clemserve_serve_with_its_own_defaults() -> None:
    """No variable of the Makefile's reaches the server but the address and SERVE_FLAGS: the same cache, the
    same offline hub as clemserve serve typed by hand."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEMSERVE_", "HF_")) and k not in ("HOST", "PORT")}
    run = subprocess.run(
        ["make", "--no-print-directory", "-pn", "serve", "HOST=::1", "PORT=6001", "SERVE_FLAGS=--online"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=True,
    )  # fmt: skip
    lines = run.stdout.splitlines()
    assert "exec .venv/bin/clemserve serve --host ::1 --port 6001 --online" in lines
    # the Makefile's own variables (make -p marks each with its origin)
    defined = {lines[i + 1].split()[0] for i, line in enumerate(lines[:-1]) if line.startswith("# makefile (from")}
    assert {"VENV", "STAMP"} <= defined
    exported = [line for line in lines if line.startswith("export ")]
    assert not {"HF_HUB_OFFLINE", "CLEMSERVE_CACHE_DIR", "TOKENIZERS_PARALLELISM"} & defined, exported


def needed(what: str, present: bool, how: str) -> None:
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing: {how}")
        pytest.skip(f"{what} is missing: {how}")


@pytest.fixture(scope="module")
def demo_server(server_pool: ServerPool) -> ServerProcess:
    """The packaged registry, as make serve serves it (test_demo_model.py's server too, which logs at DEBUG);
    the prepared demo model is cached across runs."""
    return server_pool(None, "--log-level", "DEBUG", cache_dir=DEMO_CACHE)


def test_the_quick_start_runs_as_written(demo_server: ServerProcess, tmp_path: Path) -> None:
    needed("the game machine's environment", (REPO / ".venv-clemcore" / "bin" / "clem").exists(), "make clemcore-env")
    needed("node", shutil.which("node", path=FRESH_PATH) is not None, "install Node.js")
    needed("the shared clembench games", (GAMES / "hellogame").is_dir(), f"expected in {GAMES}")
    # a new shell has neither command until the Quick start activates an environment
    assert shutil.which("clemserve", path=FRESH_PATH) is None and shutil.which("clem", path=FRESH_PATH) is None
    home = tmp_path / "home"
    shutil.copytree(GAMES / "hellogame", home / "clembench" / "hellogame")  # the user's clembench checkout
    _, commands = quick_start()
    script = "set -e -o pipefail -x\n" + commands.replace(SERVE_ADDRESS, demo_server.address)
    env = {"PATH": FRESH_PATH, "HOME": str(home), "LANG": "C.UTF-8", "CLEMSERVE_ADDRESS": demo_server.address}
    run = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=1200, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    out = run.stdout.splitlines()
    # clemserve models (a table), then clemserve generate
    header = next(i for i, line in enumerate(out) if line.startswith("NAME "))
    answer = next(i for i, line in enumerate(out) if "Paris" in line)
    assert {"smollm2-135m-instruct", "echo"} <= {line.split()[0] for line in out[header + 1 : answer]}, run.stdout
    assert "echo: Hello from Node.js" in out  # the Node example
    assert "wrote clemserve_api.py" in out  # clemcore-setup, in the clembench checkout
    # every episode of the game's instances file was played through the server, recorded and transcribed
    instances = json.loads((home / "clembench" / "hellogame" / "in" / "instances.json").read_text())
    results = home / "clembench" / "results" / "smollm2-135m-instruct" / "hellogame"
    for experiment in instances["experiments"]:
        played = sorted((results / experiment["name"]).glob("instance_*"))
        assert len(played) == len(experiment["game_instances"]), played
        for episode in played:
            assert (episode / "transcript.html").exists(), episode
            turns = json.loads((episode / "interactions.json").read_text())["turns"]
            calls = json.loads((episode / "player_1.requests.json").read_text())["calls"]
            assert turns and calls, episode
            prompt = calls[0]["call"]["manipulated_prompt_obj"]  # as the server rendered it for the demo model
            assert prompt["inputs"].startswith("<|im_start|>system") and prompt["max_new_tokens"] == 30, prompt
    assert not (REPO / "clemserve_api.py").exists()  # nothing was written into this checkout


def test_the_servers_address_answers_the_demo_model_on_transformers_and_on_llama_cpp(
    demo_server: ServerProcess,
) -> None:
    """One server for the local families: make serve's registry has the demo model and its GGUF twin, and the
    main environment runs both (llama.cpp with make llamacpp-env, which make test runs)."""
    import clemserve.client as backends

    needed("llama-cpp-python in the main environment", find_spec("llama_cpp") is not None, "make llamacpp-env")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answers = {}
    for name in ("smollm2-135m-instruct", "smollm2-135m-instruct-gguf"):
        model = backends.get_model_for(name, address=demo_server.address, timeout=600)
        model.set_gen_args(temperature=0.0, max_tokens=8)
        answers[name] = model.generate_response(question)
    # each in its clembench backend's shapes: transformers' decoded text, llama.cpp's completion dict
    prompt, response, text = answers["smollm2-135m-instruct"]
    assert text and response["response"].startswith(prompt["inputs"])
    prompt, response, text = answers["smollm2-135m-instruct-gguf"]
    assert text and prompt["return_full_text"] is False and response["response"]["choices"][0]["text"]
    listed = {s.name: s for s in backends.list_models(address=demo_server.address)}
    assert {(listed[name].model_spec["backend"], listed[name].state) for name in answers} == {
        ("huggingface_local", "ready"),
        ("llamacpp", "ready"),
    }
