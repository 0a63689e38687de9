"""``clemserve run --replay FILE``: the run's calls answered from a record that ``clemserve serve --record``
wrote, by a clemserve server of the run's own.

The run starts ``clemserve serve --replay FILE`` on a free loopback port and points its episode workers at it.
One server answers every worker, so identical requests get the recorded answers in their recorded order
across the whole run, as ``serve --replay`` gives them. Its registry is made from the record (each model's
entry as the recording server resolved it: name, backend, model id), so a request of the run is the
recorded request exactly when the game sent the same messages with the same arguments. A miss is refused
(the episode fails with ``REPLAY_MISS``) or, with ``--replay-miss forward``, answered by calling the model
from this server, with the key file it finds (``./key.json``, then ``~/.clemcore/key.json``). The run's
summary ends with the replay's: calls answered, and the misses by model and request hash.

It needs the server installed where the run runs (clemserve's ``[server]`` extra), in the run's environment
or another one (``--replay-python``); nothing else of the recording server's set-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: how long the replay server may take to start
START_S = 60.0
_SERVING = re.compile(r"\bSERVING \d+ registry entries")
_SUMMARY = re.compile(r"(replay of .*)$", re.MULTILINE)


class ReplayError(Exception):
    """The replay server could not start (a record that is not one, the server not installed)."""


def record_entries(record: Path) -> list[dict[str, Any]]:
    """Each model's registry entry in the record, once (lines that are not records are left to the server,
    which names them when it refuses to start)."""
    entries: dict[str, dict[str, Any]] = {}
    with open(record, encoding="utf-8") as lines:
        for line in lines:
            try:
                model = json.loads(line)["request"]["model"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(model, dict) and isinstance(model.get("model_name"), str):
                known = entries.setdefault(model["model_name"], model)
                if known != model:
                    raise ReplayError(
                        f"{record}: model {model['model_name']!r} is recorded with two registry entries "
                        f"({known} and {model}); replay a record of one server"
                    )
    return list(entries.values())


class ReplayServer:
    """``clemserve serve --replay`` on a free loopback port, in a folder of its own, for one run."""

    def __init__(self, record: Path, miss: str, python: str | None = None) -> None:
        self.record, self.miss = record.resolve(), miss
        #: the Python that runs the server: this one, or another environment's (``--replay-python``)
        self.python = python or sys.executable
        self.folder = Path(tempfile.mkdtemp(prefix="clemserve-replay-"))
        self.log_path = self.folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start the server on a free port; its address. The caller goes on while it starts (:meth:`wait`)."""
        if not self.record.is_file():
            raise ReplayError(f"--replay {self.record}: no such file")
        if self.python == sys.executable and importlib.util.find_spec("grpc_health") is None:
            raise ReplayError(
                "--replay runs a clemserve server, which is not installed here (no module grpc_health): install "
                "clemserve's [server] extra, or name another environment's Python with --replay-python"
            )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        registry = self.folder / "model_registry.json"
        registry.write_text(json.dumps(record_entries(self.record), indent=2), encoding="utf-8")
        command = [
            self.python, "-m", "clemserve.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--registry", str(registry), "--cache-dir", str(self.folder / "cache"),
            "--replay", str(self.record), "--replay-miss", self.miss,
        ]  # fmt: skip
        # none of the server settings of this shell (another server's --record, token or TLS) applies to it
        env = {name: value for name, value in os.environ.items() if not name.startswith("CLEMSERVE_")}
        keys = Path("key.json")
        if keys.is_file():  # clemcore's key file, where a forwarded miss needs it
            command += ["--key-file", str(keys.resolve())]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, env=env)
        return f"127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait(self) -> None:
        """Return once the server serves; ReplayError with its words if it stops first."""
        assert self.process is not None
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            log = self.log()
            if _SERVING.search(log):
                return
            if self.process.poll() is not None:
                lines = [line for line in log.splitlines() if line.startswith("clemserve:")] or log.splitlines()[-5:]
                raise ReplayError("the replay server did not start: " + " ".join(lines))
            time.sleep(0.05)
        log = self.log()
        self.stop()
        raise ReplayError(f"the replay server did not start within {START_S:.0f} s:\n{log}")

    def stop(self) -> str:
        """Stop the server; the replay's summary (calls answered, misses) as it logged it ("" if it logged none:
        it did not start)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        log = self.log()
        shutil.rmtree(self.folder, ignore_errors=True)
        found = _SUMMARY.search(log)
        return found.group(1) if found else ""
