"""``GenerateBatch`` on a remote model: the rows go to the provider side by side, not one after another, so
``clem run -b N`` and batched clients gain what ``clemserve run`` gains from parallel episodes."""

from __future__ import annotations

import time

import clemserve.client as backends
from tests.providers import openai_reply
from tests.serving import ServerProcess
from tests.standin import Reply, StandIn

CHAT = r"^/chat/completions$"
ROWS = 16
DELAY_S = 0.3
ENTRIES = [{"model_name": "gpt-batch", "backend": "openai", "model_id": "gpt-4o-mini"}]


def test_batch_rows_of_a_remote_model_run_concurrently(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", CHAT, Reply(200, openai_reply("row"), delay_s=DELAY_S))
    model = backends.get_model_for("gpt-batch", address=server.address)
    model.set_gen_args(temperature=0.0, max_tokens=20)
    rows = [[{"role": "user", "content": f"Row {i}"}] for i in range(ROWS)]
    model.generate_response(rows[0])  # the first call builds the provider client; not what is measured
    standin.reset()

    started = time.monotonic()
    results = model.generate_batch_response(rows)
    took = time.monotonic() - started

    assert [text for _, _, text in results] == ["row"] * ROWS
    assert len(list(standin.matching(CHAT))) == ROWS
    # sequential rows would take ROWS x DELAY_S = 4.8 s; side by side, about one delay
    assert took < ROWS * DELAY_S / 4, took
    assert standin.max_in_flight >= ROWS // 2, standin.max_in_flight
