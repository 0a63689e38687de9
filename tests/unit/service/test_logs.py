"""Log lines with the request id, library loggers kept at WARNING, and redaction installed on the handlers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from clemserve.service.logs import configure_logging, redact_logs, request_id_var
from clemserve.service.security.redaction import REDACTED, Redactor

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: put back what the test run had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("transformers", "httpx")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in libraries.items():
        logging.getLogger(name).setLevel(saved)


def formatted(record_args: tuple[object, ...], message: str) -> str:
    (handler,) = logging.getLogger().handlers
    record = logging.LogRecord("clemserve.test", logging.INFO, __file__, 1, message, record_args, None)
    assert all(f.filter(record) for f in handler.filters)
    return handler.format(record)


def test_every_line_carries_the_request_id(root_logging: None) -> None:
    configure_logging("INFO")
    assert logging.getLogger().level == logging.INFO
    assert formatted((), "no call").endswith("INFO clemserve.test [-] no call")
    token = request_id_var.set("rid-42")
    try:
        assert formatted(("m",), "loaded %s").endswith("INFO clemserve.test [rid-42] loaded m")
    finally:
        request_id_var.reset(token)


def test_chatty_libraries_stay_at_warning_unless_the_level_is_higher(root_logging: None) -> None:
    configure_logging("DEBUG")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("transformers").level == logging.WARNING
    configure_logging("ERROR")
    assert logging.getLogger("httpx").level == logging.ERROR


def test_redaction_scrubs_what_the_handlers_write(root_logging: None) -> None:
    configure_logging("INFO")
    redact_logs(Redactor([SECRET]))
    line = formatted((SECRET,), "calling with %s")
    assert SECRET not in line and REDACTED in line
