"""Context sizes as registry entries write them: clembench's rule (an int, or digits with k or m)."""

from __future__ import annotations

import pytest

from clemserve.service.backends.context import parse_context_size


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("128k", 131072),
        (" 128K ", 131072),
        ("1m", 1048576),
        ("2M", 2097152),
    ],
)
def test_sizes_in_the_forms_entries_use(value: object, size: int) -> None:
    assert parse_context_size(value) == size


@pytest.mark.parametrize("value", [None, 0, -5, True, False, 4096.0, "", "4k5", "12g", "k", "1.5k", "-4k", [4096]])
def test_anything_else_is_no_size(value: object) -> None:
    assert parse_context_size(value) is None
