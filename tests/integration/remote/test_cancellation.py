"""A caller that gives up takes its upstream request with it: the provider sees the connection close."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.providers import openai_reply
from tests.standin import Reply, StandIn

OPENAI = openai_reply("late")
ENTRIES = [{"model_name": "slow-openai", "backend": "openai", "model_id": "gpt-x", "model_config": {}}]


def test_deadline_cancels_the_upstream_request(server: Any, standin: StandIn) -> None:
    import clemserve.client as backends

    standin.script("POST", r"/chat/completions$", Reply(200, OPENAI, delay_s=10))
    # loaded first (importing a provider SDK can take longer than the deadline): the deadline is the call's
    backends.preload("slow-openai", address=server.address, timeout=60)
    model = backends.get_model_for("slow-openai", address=server.address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(backends.ClemserveError) as caught:
        model.generate_response([{"role": "user", "content": "hi"}])
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 2
    (request,) = standin.matching(r"/chat/completions$")  # and it was not retried
    deadline = time.monotonic() + 3
    while not request.abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.abandoned, "the provider's connection stayed open after the caller gave up"
