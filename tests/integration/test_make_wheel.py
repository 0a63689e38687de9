"""``make wheel``: the file the README tells other machines to ``pip install`` (clemserve is not on PyPI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.serving import REPO


def test_make_wheel_builds_the_wheel_the_readme_names(tmp_path: Path) -> None:
    # the environment running this test is the one make install built: not rebuilt here (-o names the stamp as
    # the Makefile does, relative to the checkout)
    stamp = os.path.relpath(Path(sys.executable).parent.parent / ".clemserve-installed", REPO)
    run = subprocess.run(
        ["make", "--no-print-directory", "-o", stamp, "wheel", f"DIST={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = tmp_path.glob("clemserve-*-py3-none-any.whl")
    assert run.stdout.splitlines()[-1] == str(wheel)
    readme = (REPO / "README.md").read_text()
    assert f"pip install {wheel.name}" in readme and "make wheel" in readme
    assert "pip install clemserve" not in readme.replace(f"pip install {wheel.name}", "")
