"""Prefix reuse made visible through the real server and client, on the tiny model (its float32 weights keep the
prefix cache on by default): a reply's usage, ListModels and ``clemserve models``."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

FIRST = [{"role": "user", "content": "Describe the grid below, row by row, in the order given. " * 4}]
#: the next turn of the same conversation: the first prompt, the model's reply, the game's answer
SECOND = [*FIRST, {"role": "assistant", "content": "A B C"}, {"role": "user", "content": "Again, please."}]


def test_a_turn_that_repeats_the_conversation_so_far_reports_the_tokens_served_from_the_cache(server: Any) -> None:
    import clemserve.client as backends

    model = backends.get_model_for("tiny-llama", address=server.address, timeout=120)
    model.set_gen_args(temperature=0.0, max_tokens=4)
    model.generate_response(FIRST)
    before = model.spent
    model.generate_response(SECOND)
    call = model.spent - before
    assert 0 < call.cached_prompt_tokens < call.prompt_tokens, call

    status = {s.name: s for s in backends.list_models(address=server.address)}["tiny-llama"]
    assert status.prefix_caching == "prefix cache up to 1024 MiB" and status.prefix_cache_bytes > 0
    assert status.spend.cached_prompt_tokens >= call.cached_prompt_tokens

    listed = subprocess.run(
        [sys.executable, "-m", "clemserve.client.cli", "models", "--memory", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    header, *rows = [line.split() for line in listed.stdout.splitlines()]
    assert "REUSED" in header
    row = next(row for row in rows if row[0] == "tiny-llama")
    assert row[12].endswith("%") and row[12] != "0%", listed.stdout  # the 13th column (header names have spaces)
    line = next(line for line in listed.stdout.splitlines() if line.startswith("tiny-llama prefix reuse: prefix cache"))
    assert "MiB; " in line and "% of " in line and line.endswith("prompt tokens reused"), line
