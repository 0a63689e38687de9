"""Scale-out on gRPC's own load balancing: two replicas behind one multi-address target share the calls,
and when one dies mid-run every call is still answered by the other."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.serving import ServerProcess, free_port, start_server


def served(proc: ServerProcess) -> int:
    return proc.log().count("Generate -> OK")


def test_two_replicas_share_calls_and_survive_one_dying(tmp_path: Path, test_registry: Path) -> None:
    import clemserve.client as backends

    replicas = [
        start_server(
            tmp_path / name, "--registry", str(test_registry), "--log-level", "DEBUG", "--preload", "tiny-llama"
        )
        for name in ("a", "b")
        if (tmp_path / name).mkdir() is None
    ]
    a, b = replicas
    target = "ipv4:" + ",".join(r.address for r in replicas)
    try:
        model = backends.get_model_for("tiny-llama", address=target, timeout=60)
        model.set_gen_args(temperature=0.0, max_tokens=16)
        expected = model.generate_response([{"role": "user", "content": "hello"}])[2]
        for _ in range(20):
            assert model.generate_response([{"role": "user", "content": "hello"}])[2] == expected
        time.sleep(0.2)
        assert served(a) >= 5 and served(b) >= 5, (served(a), served(b))  # round robin, not pick-first

        answers: list[str] = []
        failures: list[BaseException] = []

        def game(turns: int) -> None:
            for _ in range(turns):
                try:
                    answers.append(model.generate_response([{"role": "user", "content": "hello"}])[2])
                except BaseException as exc:
                    failures.append(exc)

        players = [threading.Thread(target=game, args=(40,)) for _ in range(4)]
        for player in players:
            player.start()
        time.sleep(0.5)
        a.process.send_signal(signal.SIGKILL)  # one replica dies mid-run
        for player in players:
            player.join(timeout=120)
        assert not failures, failures[:3]
        assert len(answers) == 160 and set(answers) == {expected}
        before = served(b)
        assert model.generate_response([{"role": "user", "content": "hello"}])[2] == expected
        time.sleep(0.2)
        assert served(b) == before + 1  # the survivor serves alone now
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.stop()


def test_statuses_the_server_decides_are_not_retried(tmp_path: Path) -> None:
    """UNAVAILABLE from a provider that is down is the server's answer, not a lost connection: the client's
    retry policy must not send the call again (the server sends a "do not retry" pushback)."""
    import clemserve.client as backends

    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps([{"model_name": "down", "backend": "openai", "model_id": "m", "model_config": {}}]))
    keys = tmp_path / "key.json"
    keys.write_text(
        json.dumps({"openai": {"api_key": "sk-unused-0000", "base_url": f"http://127.0.0.1:{free_port()}"}})
    )
    proc = start_server(
        tmp_path, "--registry", str(registry), "--key-file", str(keys), "--remote-attempts", "1", "--log-level", "DEBUG"
    )
    try:
        model = backends.get_model_for("down", address=f"ipv4:{proc.address}", timeout=30)
        with pytest.raises(backends.UnavailableError):
            model.generate_response([{"role": "user", "content": "x"}])
        time.sleep(0.2)
        assert proc.log().count("Generate -> UNAVAILABLE") == 1
    finally:
        proc.stop()
