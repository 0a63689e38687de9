"""clembench's message clean-up before generation (spec section 4.2); logged prompts depend on it exactly."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MERGE_DELIMITER", "ensure_alternating_roles", "ensure_alternating_roles_batch"]

#: clemcore HEAD joins merged contents with this; clembench 2024 used a single space
MERGE_DELIMITER = "\n\n"


def ensure_alternating_roles(
    messages: Sequence[Mapping[str, Any]], cull_system_message: bool = True
) -> list[dict[str, Any]]:
    """A copy of ``messages`` in which no two neighbours share a role, as clemcore HEAD computes it.

    - With ``cull_system_message``, the first message is dropped if it is a system message with falsy
      content; only the first, only once. An empty list then raises IndexError, as in clembench.
    - Each run of same-role neighbours (any role, system too) becomes its first message with the contents
      joined by a blank line; the later messages' other keys (an ``image``, say) are lost, as in clembench.
    The input is never mutated.
    """
    copied: list[dict[str, Any]] = [dict(copy.deepcopy(message)) for message in messages]
    if cull_system_message and copied[0]["role"] == "system" and not copied[0]["content"]:
        del copied[0]
    if len(copied) <= 1:
        return copied
    # one pass that merges each run into its head gives what clembench's repeat-until-stable loop gives
    merged: list[dict[str, Any]] = [copied[0]]
    for message in copied[1:]:
        previous = merged[-1]
        if previous["role"] == message["role"]:
            previous["content"] = f"{previous['content']}{MERGE_DELIMITER}{message['content']}"
        else:
            merged.append(message)
    return merged


def ensure_alternating_roles_batch(
    rows: Sequence[Sequence[Mapping[str, Any]]], cull_system_message: bool = True
) -> list[list[dict[str, Any]]]:
    """Each conversation of a batch processed on its own (clembench's ``ensure_messages_format``)."""
    return [ensure_alternating_roles(row, cull_system_message) for row in rows]
