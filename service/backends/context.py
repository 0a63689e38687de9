"""Context sizes as registry entries write them ("128k", "131072", 4096)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+)([km]?)$")


def parse_context_size(value: object) -> int | None:
    """clembench's rule: an int, or a string of digits with an optional k (x1024) or m (x1024^2)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str):
        match = _SIZE.match(value.strip().lower())
        if match:
            return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]
    return None
