"""ensure_alternating_roles: spec section 4.2 and conformance cases 30-32."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from clemserve.registry import ensure_alternating_roles, ensure_alternating_roles_batch
from clemserve.registry.messages import MERGE_DELIMITER


def _msg(role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


# -- case 30: culling ------------------------------------------------------------------------------------


def test_case30_empty_first_system_message_is_culled() -> None:
    messages = [_msg("system", ""), _msg("user", "Hi"), _msg("assistant", "Hello")]
    assert ensure_alternating_roles(messages) == [_msg("user", "Hi"), _msg("assistant", "Hello")]


def test_case30_cull_disabled_keeps_it() -> None:
    messages = [_msg("system", ""), _msg("user", "Hi"), _msg("assistant", "Hello")]
    assert ensure_alternating_roles(messages, cull_system_message=False) == messages


def test_case30_non_empty_system_message_is_kept() -> None:
    messages = [_msg("system", "System"), _msg("user", "Hi"), _msg("assistant", "Hello")]
    assert ensure_alternating_roles(messages) == messages


def test_case30_none_content_counts_as_empty() -> None:
    assert ensure_alternating_roles([_msg("system", None), _msg("user", "Hi")]) == [_msg("user", "Hi")]


def test_case30_only_the_first_message_is_culled_once() -> None:
    messages = [_msg("system", ""), _msg("system", ""), _msg("user", "u")]
    # the second empty system message survives the cull
    assert ensure_alternating_roles(messages) == [_msg("system", ""), _msg("user", "u")]


def test_case30_single_culled_message_leaves_an_empty_list() -> None:
    assert ensure_alternating_roles([_msg("system", "")]) == []


def test_case30_a_middle_system_message_stays_put() -> None:
    messages = [_msg("user", "a"), _msg("system", ""), _msg("user", "b")]
    assert ensure_alternating_roles(messages) == messages


# -- case 31: merging ------------------------------------------------------------------------------------


def test_case31_two_assistant_messages_merge() -> None:
    messages = [
        _msg("user", "Initial Prompt"),
        _msg("assistant", "Turn 1"),
        _msg("assistant", "Response 1"),
    ]
    assert ensure_alternating_roles(messages) == [
        _msg("user", "Initial Prompt"),
        _msg("assistant", "Turn 1\n\nResponse 1"),
    ]


def test_case31_two_user_messages_merge() -> None:
    messages = [_msg("user", "Initial Prompt"), _msg("user", "Turn 1"), _msg("assistant", "R")]
    assert ensure_alternating_roles(messages) == [
        _msg("user", "Initial Prompt\n\nTurn 1"),
        _msg("assistant", "R"),
    ]


def test_case31_three_in_a_row_collapse() -> None:
    assert ensure_alternating_roles([_msg("user", "A"), _msg("user", "B"), _msg("user", "C")]) == [
        _msg("user", "A\n\nB\n\nC")
    ]


def test_case31_both_kinds_of_doubling() -> None:
    messages = [
        _msg("system", "S"),
        _msg("user", "u1"),
        _msg("user", "u2"),
        _msg("assistant", "a1"),
        _msg("assistant", "a2"),
        _msg("assistant", "a3"),
        _msg("user", "u3"),
        _msg("user", "u4"),
        _msg("user", "u5"),
        _msg("user", "u6"),
    ]
    assert ensure_alternating_roles(messages) == [
        _msg("system", "S"),
        _msg("user", "u1\n\nu2"),
        _msg("assistant", "a1\n\na2\n\na3"),
        _msg("user", "u3\n\nu4\n\nu5\n\nu6"),
    ]


def test_case31_system_runs_merge_too() -> None:
    messages = [_msg("system", "s1"), _msg("system", "s2"), _msg("user", "u")]
    assert ensure_alternating_roles(messages) == [_msg("system", "s1\n\ns2"), _msg("user", "u")]


def test_case31_delimiter_is_a_blank_line() -> None:
    assert MERGE_DELIMITER == "\n\n"


# -- case 32: copies, lost extras, empty input -----------------------------------------------------------


def test_case32_input_is_never_mutated() -> None:
    messages = [_msg("system", ""), _msg("user", "a", image=["x.png"]), _msg("user", "b")]
    before = copy.deepcopy(messages)
    result = ensure_alternating_roles(messages)
    assert messages == before
    result[0]["image"].append("y.png")
    assert messages[1]["image"] == ["x.png"]


def test_case32_second_message_image_is_dropped() -> None:
    messages = [_msg("user", "a", image=["first.png"]), _msg("user", "b", image=["second.png"])]
    assert ensure_alternating_roles(messages) == [_msg("user", "a\n\nb", image=["first.png"])]


def test_case32_empty_input_raises_index_error() -> None:
    with pytest.raises(IndexError):
        ensure_alternating_roles([])


def test_empty_input_without_culling_is_returned() -> None:
    assert ensure_alternating_roles([], cull_system_message=False) == []


def test_non_string_contents_are_joined_as_clembench_formats_them() -> None:
    assert ensure_alternating_roles([_msg("user", None), _msg("user", 1)], cull_system_message=False) == [
        _msg("user", "None\n\n1")
    ]


def test_batch_processes_each_row() -> None:
    rows = [
        [_msg("user", "a"), _msg("user", "b")],
        [_msg("system", ""), _msg("user", "c"), _msg("assistant", "d")],
    ]
    before = copy.deepcopy(rows)
    assert ensure_alternating_roles_batch(rows) == [
        [_msg("user", "a\n\nb")],
        [_msg("user", "c"), _msg("assistant", "d")],
    ]
    assert rows == before
    assert ensure_alternating_roles_batch([]) == []
