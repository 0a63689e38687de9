"""No key, nor any part of one longer than its last 4 characters, leaves the server: one request through
every remote backend (answered, then refused with 401), with every answer, error and log line scanned."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.providers import FAKE_KEYS, assert_no_key_leaks, openai_reply
from tests.standin import Reply, StandIn

ENTRIES = [
    {"model_name": "leak-openai", "backend": "openai", "model_id": "gpt-x", "model_config": {}},
    {"model_name": "leak-compatible", "backend": "openai_compatible", "model_id": "m", "model_config": {}},
    {"model_name": "leak-openrouter", "backend": "openrouter", "model_id": "a/b", "model_config": {}},
    {"model_name": "leak-azure-gpt", "backend": "azure", "model_id": "gpt-x", "model_config": {}},
    {"model_name": "leak-azure-claude", "backend": "azure", "model_id": "claude-x", "model_config": {}},
    {"model_name": "leak-anthropic", "backend": "anthropic", "model_id": "claude-x", "model_config": {}},
    {"model_name": "leak-mistral", "backend": "mistral", "model_id": "mistral-x", "model_config": {}},
    {"model_name": "leak-cohere", "backend": "cohere", "model_id": "command-x", "model_config": {}},
    {"model_name": "leak-google", "backend": "google", "model_id": "gemini-x", "model_config": {}},
]

OPENAI = openai_reply(" fine ")
ANTHROPIC = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-x",
    "content": [{"type": "text", "text": "fine"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}
GEMINI = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": "fine"}]}, "finishReason": "STOP"}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
}
COHERE = {
    "id": "c1",
    "finish_reason": "COMPLETE",
    "message": {"role": "assistant", "content": [{"type": "text", "text": "fine"}]},
    "usage": {"tokens": {"input_tokens": 3, "output_tokens": 1}},
}
ROUTES = {r"/chat/completions$": OPENAI, r"/messages$": ANTHROPIC, r":generateContent$": GEMINI, r"/v2/chat$": COHERE}


def refusal(recorded: Any) -> Reply:
    """A 401 that echoes the key back in part, as real providers do ("Incorrect API key provided: sk-ab***")."""
    sent = recorded.headers.get("authorization", "") + recorded.headers.get("x-api-key", "")
    sent += recorded.headers.get("x-goog-api-key", "")
    echoed = sent.split()[-1] if sent else ""
    message = f"Incorrect API key provided: {echoed[:8]}***{echoed[-4:]}; full: {echoed}"
    return Reply(401, {"error": {"message": message, "type": "invalid_request_error", "code": 401}, "message": message})


def test_no_backend_leaks_a_key(server: Any, standin: StandIn) -> None:
    import clemserve.client as backends

    seen: list[str] = []
    for path, body in ROUTES.items():
        standin.script("POST", path, Reply(200, body))
    for entry in ENTRIES:
        model = backends.get_model_for(entry["model_name"], address=server.address, timeout=30)
        prompt, response, text = model.generate_response([{"role": "user", "content": "hi"}])
        assert text.strip() == "fine", entry["model_name"]
        seen.append(json.dumps([prompt, response, text]))
    for path in ROUTES:
        standin.script("POST", path, refusal)
    for entry in ENTRIES:
        model = backends.get_model_for(entry["model_name"], address=server.address, timeout=30)
        with pytest.raises(backends.FailedPreconditionError) as caught:
            model.generate_response([{"role": "user", "content": "hi"}])
        err = caught.value
        seen.append(f"{err} {err.subject} {err.metadata}")
        assert "key.json" in str(err)
    # every backend really sent its key, so the scan below is meaningful
    sent = " ".join(json.dumps(r.headers) for r in standin.requests)
    for name in ("openai", "anthropic", "mistral", "cohere", "google", "openrouter", "azure_gpt", "azure_claude"):
        assert FAKE_KEYS[name] in sent, name
    time.sleep(0.2)  # the last log lines reach the file
    assert_no_key_leaks("\n".join(seen))
    assert_no_key_leaks(server.log())
