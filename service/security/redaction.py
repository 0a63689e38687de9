"""Keep secrets out of every message that leaves the process: responses, errors and log lines.

A secret may show its last four characters (enough to tell two keys apart) and nothing longer: any
run of five or more characters that also occurs in a secret is replaced. That catches the key itself,
the prefixes and suffixes providers echo back ("Incorrect API key provided: sk-abc***wxyz") and keys
embedded in URLs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

_WINDOW = 5
REDACTED = "[redacted]"


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._windows: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        secret = secret.strip()
        if len(secret) >= _WINDOW:
            self._windows.update(secret[i : i + _WINDOW] for i in range(len(secret) - _WINDOW + 1))

    def __bool__(self) -> bool:
        return bool(self._windows)

    def redact(self, text: str) -> str:
        if not self._windows or len(text) < _WINDOW:
            return text
        covered = bytearray(len(text))
        for i in range(len(text) - _WINDOW + 1):
            if text[i : i + _WINDOW] in self._windows:
                covered[i : i + _WINDOW] = b"\x01" * _WINDOW
        if not any(covered):
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            if covered[i]:
                while i < len(text) and covered[i]:
                    i += 1
                out.append(REDACTED)
            else:
                out.append(text[i])
                i += 1
        return "".join(out)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final text (message, arguments and traceback) before a handler sees it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.redactor.redact(text), None
        return True
