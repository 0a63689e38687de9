"""A stand-in for the Hugging Face hub on loopback: the few endpoints huggingface_hub calls to describe a model
repo (``model_info``, the tree listing) and to download its files (``resolve``, HEAD and GET), serving local
folders as repos. A server or test reaches it through ``HF_ENDPOINT``.

Weight files (``.safetensors``, ``.bin``) are served as the hub serves LFS files (their etag the sha256 of
their bytes), others as git blobs. A download can be slowed (``delay_s`` after each ``chunk`` bytes of a
weight file) or stalled (``stall_after`` bytes, then nothing until :meth:`release`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_LFS = (".safetensors", ".bin")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class HubFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(_LFS)

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else self.blob_id


@dataclass(frozen=True)
class Repo:
    sha: str
    files: dict[str, HubFile]


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class StandInHub:
    """``add(repo_id, folder)`` serves the folder's files as that repo; ``requests`` records (method, path)."""

    def __init__(self, chunk: int = 16384, delay_s: float = 0.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.chunk, self.delay_s = chunk, delay_s
        #: bytes of a weight file sent before the download stalls (None: it never does)
        self.stall_after: int | None = None
        self._released = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, folder: Path) -> Repo:
        files = {p.name: HubFile(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}
        sha = hashlib.sha1(repo_id.encode() + b"".join(f.etag.encode() for f in files.values())).hexdigest()
        repo = self.repos[repo_id] = Repo(sha, files)
        return repo

    def release(self) -> None:
        """Let stalled downloads go on."""
        self._released.set()

    def resolved(self) -> list[str]:
        """The files that were downloaded (GET), in order."""
        return [path.rsplit("/", 1)[-1] for method, path in self.requests if method == "GET" and "/resolve/" in path]

    # -- the endpoints ------------------------------------------------------------------------------

    def _info(self, repo_id: str, repo: Repo) -> dict[str, Any]:
        siblings = []
        for f in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": f.path, "size": len(f.data), "blobId": f.blob_id}
            if f.lfs:
                sibling["lfs"] = {"sha256": f.etag, "size": len(f.data), "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": repo.sha[:24], "id": repo_id, "modelId": repo_id, "sha": repo.sha, "siblings": siblings}

    def _tree(self, repo: Repo) -> list[dict[str, Any]]:
        tree = []
        for f in repo.files.values():
            entry: dict[str, Any] = {"type": "file", "path": f.path, "size": len(f.data), "oid": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            tree.append(entry)
        return tree

    def _chunks(self, f: HubFile, start: int) -> Iterator[bytes]:
        sent = start
        while sent < len(f.data):
            if f.lfs and self.stall_after is not None and sent >= self.stall_after:
                self._released.wait()
            piece = f.data[sent : sent + self.chunk]
            yield piece
            sent += len(piece)
            if f.lfs and self.delay_s:
                time.sleep(self.delay_s)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _json(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, text in (headers or {}).items():
                    self.send_header(name, text)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _missing(self, code: str) -> None:
                self._json({"error": code}, 404, {"X-Error-Code": code, "X-Error-Message": code})

            def _serve(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, path))
                for pattern in (_TREE, _API, _RESOLVE):
                    if match := pattern.match(path):
                        break
                else:
                    return self._missing("EntryNotFound")
                repo = hub.repos.get(match["repo"])
                if repo is None:
                    return self._missing("RepoNotFound")
                if pattern is _API:
                    return self._json(hub._info(match["repo"], repo))
                if pattern is _TREE:
                    return self._json(hub._tree(repo) if not match["path"] else [])
                f = repo.files.get(match["path"])
                if f is None:
                    return self._missing("EntryNotFound")
                self._file(repo, f, body)

            def _file(self, repo: Repo, f: HubFile, body: bool) -> None:
                start = 0
                if ranged := re.match(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(ranged[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{f.blob_id}"')
                if f.lfs:
                    self.send_header("X-Linked-Etag", f'"{f.etag}"')
                    self.send_header("X-Linked-Size", str(len(f.data)))
                self.send_header("Content-Length", str(len(f.data) - start))
                self.end_headers()
                if body:
                    for piece in hub._chunks(f, start):
                        self.wfile.write(piece)
                        self.wfile.flush()

        return Handler


def serve_as_hub(monkeypatch: Any, hub: StandInHub, home: Path) -> Path:
    """Point huggingface_hub in this process at ``hub``, online, with a fresh cache under ``home`` (its
    settings are read once, at import, so they are patched where it keeps them); the cache folder."""
    from huggingface_hub import constants

    cache = home / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache
