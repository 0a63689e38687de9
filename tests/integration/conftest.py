"""What integration tests share beyond a server: the wheel ``make wheel`` builds, once a session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.serving import REPO


@dataclass(frozen=True)
class MadeWheel:
    """What ``make wheel DIST=dist`` did: its run, and the wheel it left in ``dist``."""

    run: subprocess.CompletedProcess[str]
    dist: Path

    @property
    def path(self) -> Path:
        assert self.run.returncode == 0, self.run.stdout + self.run.stderr
        (wheel,) = self.dist.glob("clemserve-*-py3-none-any.whl")
        return wheel


@pytest.fixture(scope="session")
def made_wheel(tmp_path_factory: pytest.TempPathFactory) -> MadeWheel:
    """The file the README tells other machines to ``pip install``, built as it says (``make wheel``)."""
    dist = tmp_path_factory.mktemp("dist")
    # the environment running the tests is the one make install built: not rebuilt here (-o names the stamp as
    # the Makefile does, relative to the checkout)
    stamp = os.path.relpath(Path(sys.executable).parent.parent / ".clemserve-installed", REPO)
    run = subprocess.run(
        ["make", "--no-print-directory", "-o", stamp, "wheel", f"DIST={dist}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return MadeWheel(run, dist)
