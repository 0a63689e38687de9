"""Logging with the request id on every line."""

from __future__ import annotations

import contextvars
import logging
import sys

from .security.redaction import RedactingFilter, Redactor

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("clemserve_request_id", default="-")
#: the caller's gRPC deadline as a time.monotonic() value, or None; remote retries never pass it
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("clemserve_deadline", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def redact_logs(redactor: Redactor) -> None:
    """From now on, every log line passes through ``redactor`` (installed once the keys are read)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(redactor))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries below us are chatty at INFO; their warnings still show.
    for name in ("transformers", "accelerate", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
