"""A stand-in for a provider's HTTP API on loopback: it records every request and answers as scripted.

Tests point an SDK's base_url at it and assert the exact requests the SDK sends. Replies can be delayed,
fail with any status, carry any headers, or be malformed, for fault injection. A reply with ``chunks`` is
streamed (chunked transfer encoding, as providers stream server-sent events): each chunk is written and
flushed on its own, ``chunk_delay_s`` after the one before, and ``cut`` drops the connection after the
last one instead of ending the body (a stream that breaks).
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    #: a dict or list is sent as JSON; str or bytes as they are
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: a streamed body (``body`` is not used): str or bytes pieces, each written as it is due
    chunks: list[str | bytes] | None = None
    chunk_delay_s: float = 0.0
    #: drop the connection after the chunks, without the end of the chunked body
    cut: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    #: the client closed the connection before the reply was sent
    abandoned: bool = False

    @property
    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None


Responder = Callable[[Recorded], Reply]


class _Server(ThreadingHTTPServer):
    # a deep accept backlog: the default of 5 turns a burst of concurrent connections into SYN retries
    request_queue_size = 256
    daemon_threads = True


class StandIn:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        #: replies never sent because the client closed the connection while the reply was delayed
        self.abandoned = 0
        self._routes: list[tuple[str, re.Pattern[str], list[Reply] | Responder]] = []
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # set it to let replies that wait on it go
        self.release.set()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def script(self, method: str, path: str, *replies: Reply | Responder) -> None:
        """Answer ``method`` on paths matching the regex ``path``: replies in order, the last one repeating
        (or a function of the request). A later script for the same route replaces the earlier one."""
        pattern = re.compile(path)
        self._routes = [r for r in self._routes if not (r[0] == method and r[1].pattern == path)]
        answer: list[Reply] | Responder = replies[0] if len(replies) == 1 and callable(replies[0]) else list(replies)  # type: ignore[assignment]
        self._routes.insert(0, (method, pattern, answer))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0

    def clear(self) -> None:
        """As new, for the next test: no routes, no requests, no counts, replies not held back. Replies
        still on their way to an earlier test's requests count nowhere but in ``in_flight``."""
        with self._lock:
            self._routes = []
            self.requests = []
            self.max_in_flight = 0
            self.abandoned = 0
        self.release.set()

    def matching(self, path: str) -> Iterator[Recorded]:
        return (r for r in list(self.requests) if re.search(path, r.path))

    def _abandon(self, recorded: Recorded) -> None:
        with self._lock:
            recorded.abandoned = True
            self.abandoned += 1

    def _answer(self, recorded: Recorded) -> Reply:
        for method, pattern, answer in self._routes:
            if method == recorded.method and pattern.search(recorded.path):
                if callable(answer):
                    return answer(recorded)
                with self._lock:
                    return answer.pop(0) if len(answer) > 1 else answer[0]
        return Reply(404, {"error": {"message": f"stand-in has no route for {recorded.method} {recorded.path}"}})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                recorded = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
                with standin._lock:
                    standin.requests.append(recorded)
                    standin.in_flight += 1
                    standin.max_in_flight = max(standin.max_in_flight, standin.in_flight)
                try:
                    reply = standin._answer(recorded)
                    if reply.delay_s and self._client_left_within(reply.delay_s):
                        standin._abandon(recorded)
                        return
                    standin.release.wait(timeout=60)
                    if reply.chunks is not None:
                        self._stream(reply, recorded)
                        return
                    body = reply.body
                    if isinstance(body, (dict, list)):
                        data = json.dumps(body).encode()
                        content_type = "application/json"
                    else:
                        data = body.encode() if isinstance(body, str) else (body or b"")
                        content_type = reply.headers.get("content-type", "application/json")
                    self.send_response(reply.status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(data)))
                    for name, value in reply.headers.items():
                        if name.lower() != "content-type":
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with standin._lock:
                        standin.in_flight -= 1

            def _stream(self, reply: Reply, recorded: Recorded) -> None:
                self.send_response(reply.status)
                self.send_header("content-type", reply.headers.get("content-type", "text/event-stream"))
                self.send_header("transfer-encoding", "chunked")
                for name, value in reply.headers.items():
                    if name.lower() != "content-type":
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.flush()
                for i, chunk in enumerate(reply.chunks or []):
                    if i and reply.chunk_delay_s and self._client_left_within(reply.chunk_delay_s):
                        standin._abandon(recorded)
                        self.close_connection = True
                        return
                    data = chunk.encode() if isinstance(chunk, str) else chunk
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                if reply.cut:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _client_left_within(self, seconds: float) -> bool:
                """Wait ``seconds``, watching the connection: True as soon as the client closes it."""
                deadline = time.monotonic() + seconds
                while (left := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([self.connection], [], [], min(left, 0.02))
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        return True
                return False

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler
