"""The fuzz target, briefly under pytest: it runs clean for a few seconds, and it does catch a crash."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).parent
TARGET = HERE / "fuzz_requests.py"
SECONDS = 10


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_requests", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzing_finds_no_crash_in_a_bounded_run(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    run = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-max_total_time={SECONDS}",
            f"-dict={HERE / 'requests.dict'}",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "corpus"),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    runs = int(re.search(r"Done (\d+) runs", output).group(1))  # type: ignore[union-attr]
    print(f"fuzz_requests: {runs} executions in {SECONDS} s")
    assert runs > 1000
    assert not list(tmp_path.glob("crash-*"))


def test_the_target_reports_what_escapes_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the JSON value check, a lone surrogate reaches the reply and the target fails."""
    target = load_target()
    from clemserve.service import validation
    from clemserve.v1 import clemserve_pb2 as pb

    request = pb.GenerateRequest(
        model=pb.ModelSelector(name="echo"),
        messages=[pb.Message(role="user", content="hi", extra_json='{"name": "\\ud800"}')],
    ).SerializeToString()
    target.test_one_input(request)  # refused with INVALID_ARGUMENT: fine
    monkeypatch.setattr(validation, "validate_json_value", lambda *args: None)
    with pytest.raises((AssertionError, UnicodeError)):
        target.test_one_input(request)


def test_the_seeds_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeds reach the backend, so mutations start from requests that pass validation."""
    target = load_target()
    from clemserve.v1 import clemserve_pb2 as pb

    answered = 0
    for seed in target.SEEDS:
        context = target.FakeContext()
        try:
            target.LOOP.run_until_complete(target.SERVICER.Generate(pb.GenerateRequest.FromString(seed), context))
            answered += 1
        except target._Aborted:
            assert context.code not in target.REFUSED
    assert answered >= 3
