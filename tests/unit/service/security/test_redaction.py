"""Secrets never leave the server: the redactor and the log filter."""

from __future__ import annotations

import logging

import pytest

from clemserve.service.security.redaction import REDACTED, RedactingFilter, Redactor

KEY = "sk-test-4f9a2b7c1d8e6f0a"


def test_whole_key_and_any_part_longer_than_four_characters_go() -> None:
    redactor = Redactor([KEY])
    assert redactor.redact(f"key {KEY} used") == f"key {REDACTED} used"
    assert KEY[:6] not in redactor.redact(f"Incorrect API key provided: {KEY[:6]}***{KEY[-4:]}")
    assert redactor.redact(f"ends with {KEY[-4:]}") == f"ends with {KEY[-4:]}"
    assert redactor.redact("nothing secret here") == "nothing secret here"


def test_empty_redactor_changes_nothing() -> None:
    assert not Redactor() and Redactor().redact(KEY) == KEY
    assert not Redactor(["abc"])  # too short to scrub without destroying ordinary text


def test_log_lines_are_scrubbed_including_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("clemserve.test.secrets")
    handler_filter = RedactingFilter(Redactor([KEY]))
    caplog.handler.addFilter(handler_filter)
    try:
        logger.warning("calling with %s", KEY)
        try:
            raise RuntimeError(f"provider said {KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert KEY[:8] not in caplog.text and REDACTED in caplog.text
    assert "RuntimeError" in caplog.text
