"""The diagnostic fault backend: its gate holds calls exactly as long as the file exists, and its faults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.backends.fault import FaultBackend
from clemserve.service.domain import FinishReason, GenArgs

HI = [{"role": "user", "content": "one two three"}]


def fault(tmp_path: Path, name: str = "f", **config: object) -> FaultBackend:
    spec = ModelSpec.from_dict({"model_name": name, "backend": "fault", "model_config": config})
    return FaultBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))


def test_a_call_waits_at_the_gate_until_its_file_is_gone(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    backend = fault(tmp_path, gate=str(gate))

    async def run() -> None:
        call = asyncio.create_task(backend.generate(HI, GenArgs(max_tokens=2)))
        await asyncio.sleep(0.1)
        assert not call.done()  # held
        gate.unlink()
        generation = await asyncio.wait_for(call, 2)
        assert generation.text == "one two" and generation.finish_reason is FinishReason.LENGTH

    asyncio.run(run())


def test_faults_on_a_word_and_on_the_first_loads(tmp_path: Path) -> None:
    backend = fault(tmp_path, raise_on="boom", oom_on="big")
    with pytest.raises(RuntimeError, match="'boom' in the message"):
        asyncio.run(backend.generate([{"role": "user", "content": "a boom"}], GenArgs()))
    with pytest.raises(MemoryError):
        asyncio.run(backend.generate([{"role": "user", "content": "too big"}], GenArgs()))
    flaky = fault(tmp_path, "flaky-twice", oom_on_load=2)
    for _ in range(2):
        with pytest.raises(MemoryError, match="fails as configured"):
            asyncio.run(flaky.load(lambda line, fraction=None: None))
    asyncio.run(flaky.load(lambda line, fraction=None: None))  # the third load succeeds
