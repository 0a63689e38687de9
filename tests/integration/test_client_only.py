"""A game process needs grpcio and protobuf only: the client never imports torch or transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.serving import ServerProcess

SEED_BASIC = """
import sys
import clemserve.client as backends

model_name = "echo"

model = backends.get_model_for(model_name)

messages = [
    {'role': "user", 'content': "Hello!"},
    {'role': "assistant", 'content': "Hello! How can I help you?"},
    {'role': "user", 'content': "Tell me the name of the capital of Australia."},
]

prompt, response, response_text = model.generate_response(messages)

print(f"{model_name} reply:")
print(response_text)
print("heavy imports:", sorted(m for m in ("torch", "transformers", "vllm") if m in sys.modules))
"""


def test_seed_example_runs_with_only_the_import_changed(server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "game.py"
    script.write_text(SEED_BASIC)
    run = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"CLEMSERVE_ADDRESS": server.address, "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "echo reply:",
        "Tell me the name of the capital of Australia.",
        "heavy imports: []",
    ]


def test_typed_example_game_plays_three_turns(server: ServerProcess) -> None:
    from tests.serving import REPO

    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "typed_game.py"), server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0] == (
        "Turn 0: guess a number between 1 and 10. | Turn 0: the other player said "
        "'Turn 0: guess a number between 1 and 10.'."
    )
