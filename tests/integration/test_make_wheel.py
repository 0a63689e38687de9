"""``make wheel``: the file the README tells other machines to ``pip install`` (clemserve is not on PyPI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.serving import REPO

if TYPE_CHECKING:
    from tests.integration.conftest import MadeWheel


def test_make_wheel_builds_the_wheel_the_readme_names(made_wheel: MadeWheel) -> None:
    wheel = made_wheel.path
    assert made_wheel.run.stdout.splitlines()[-1] == str(wheel)
    readme = (REPO / "README.md").read_text()
    assert f"pip install {wheel.name}" in readme and "make wheel" in readme
    assert "pip install clemserve" not in readme.replace(f"pip install {wheel.name}", "")
