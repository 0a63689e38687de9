"""Starting real clemserve processes for tests and benchmarks: free loopback ports, health waits, logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [
        python, "-m", "clemserve.service.cli", "serve", "--port", str(port),
        "--cache-dir", str(cache_dir or tmp / "cache"), *args,
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
