"""Starting real clemserve processes for tests and benchmarks: free loopback ports, health waits, logs, and a
pool of servers that tests share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clemserve.registry.keys import ENVIRONMENT_KEYS
from tests.tiny_model import CHAT_TEMPLATE, EOS_TO_CULL

REPO = Path(__file__).resolve().parent.parent
DEMO_CACHE = Path(os.environ.get("CLEMSERVE_CACHE_DIR", REPO / ".cache" / "clemserve"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self, since: int = 0) -> str:
        """The server's log; from ``since`` on (a :meth:`log_mark`), what a test added to a shared server's."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(since)
            return log_file.read().decode(errors="replace")

    def log_mark(self) -> int:
        """Where the log ends now."""
        return self.log_path.stat().st_size

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def wait_serving(
    address: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60, credentials: object = None
) -> None:
    """``credentials``: grpc.ChannelCredentials for a TLS server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING after {timeout} s:\n{log_path.read_text()}")


def share_file_headers(cache_dir: Path) -> None:
    """A test server's cache of its own, but with the GGUF header records (what a file says, by file version)
    of the run's cache: the gguf reader takes seconds over the demo model's vocabulary, and every server that
    lists the packaged registry would read it again."""
    shared = Path(os.environ.get("CLEMSERVE_CACHE_DIR", Path.home() / ".cache" / "clemserve")) / "gguf-headers"
    shared.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    link = cache_dir / "gguf-headers"
    if not link.exists():
        link.symlink_to(shared, target_is_directory=True)


def start_server(
    tmp: Path,
    *args: str,
    cache_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    python: str = sys.executable,
    credentials: object = None,
) -> ServerProcess:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    # offline unless --online: the server's own default
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if cache_dir is None:
        cache_dir = tmp / "cache"
        share_file_headers(cache_dir)
    command = [
        python, "-m", "clemserve.service.cli", "serve", "--port", str(port),
        "--cache-dir", str(cache_dir), *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp, env=full_env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, log_path, timeout, credentials)
    except BaseException:
        process.kill()
        raise
    return ServerProcess(address, process, log_path)


#: every provider key variable blanked: a shared server never reads the caller's own provider keys
NO_PROVIDER_KEYS = {
    variable: ""
    for source in ENVIRONMENT_KEYS.values()
    for variable in (*source.api_key, *(twin for _, twin in source.extras))
}


class ServerPool:
    """Running servers shared by every test that asks for the same registry and flags; each starts on its
    first request, in a folder of its own, with no provider key from the environment.

    For tests that only call their server: a test that stops, kills or drains its server, or needs a log of
    its own, starts its own with :func:`start_server`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._servers: dict[tuple[str, ...], ServerProcess] = {}

    def __call__(self, registry: Path | None, *flags: str, cache_dir: Path | None = None) -> ServerProcess:
        """``registry`` None: the registry that ships with clemserve; ``cache_dir`` None: one of its own."""
        args = (*(("--registry", str(registry)) if registry is not None else ()), *flags)
        key = (*args, str(cache_dir))
        proc = self._servers.get(key)
        if proc is None:
            tmp = self.folder / f"server-{len(self._servers)}"
            tmp.mkdir()
            # a long start allowed: the first start on a machine may prepare a model
            proc = start_server(tmp, *args, cache_dir=cache_dir, env=NO_PROVIDER_KEYS, timeout=300)
            self._servers[key] = proc
        return proc

    def __len__(self) -> int:
        return len(self._servers)

    def stop(self) -> list[tuple[ServerProcess, int]]:
        """Stop every server (all of them, whatever one answers); each with its exit status."""
        stopped = [(proc, proc.stop()) for proc in self._servers.values()]
        self._servers.clear()
        return stopped


def hf_entry(name: str, folder: Path, **config: object) -> dict[str, object]:
    return {
        "model_name": name,
        "backend": "huggingface_local",
        "huggingface_id": str(folder),
        "model_config": {
            "premade_chat_template": False,
            "custom_chat_template": CHAT_TEMPLATE,
            "eos_to_cull": EOS_TO_CULL,
            "padding_side": "left",
            **config,
        },
    }
