"""The nginx gateway that deploy/nginx ships, rendered by its render.py and run as real nginx in front of real
servers: one address for a two-player clembench game (guesswhat) whose players' models are on different
servers, each call routed by its ``clemserve-model`` metadata; the token passed through; the default route
for calls that name no model; and one server of a replicated pair killed mid-run with no episode lost.

The guesser plays ``echo-small`` on the session's shared server; the answerer plays ``slow-answerer`` (the
fault backend, a little slow, so that the run is still going when a server dies) on a pair of servers of
their own, which need the token. The game's prompts are replaced by ones that echo models play by the rules:
the guesser asks, the answerer answers, and the guesser's echo of the answer ends each episode (aborted,
after three calls).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.certs import make_pki
from tests.integration.test_clemcore import clemcore_python, game_side
from tests.serving import REPO, ServerProcess, free_port, start_server

GAMES = REPO.parent / "shared" / "clembench-games"
RENDER = REPO / "deploy" / "nginx" / "render.py"
GUESSER, ANSWERER = "echo-small", "slow-answerer"
TOKEN = secrets.token_urlsafe(32)
#: guesswhat's Level_1 has ten instances
EPISODES = 10


def nginx_binary() -> str:
    """nginx from PATH, or where Debian's package puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "no nginx: `make gateway-deps` installs Debian's package (make test does)"
    return found


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clemserve_nginx_render", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_config(folder: Path, site: Path) -> Path:
    """What Debian's /etc/nginx/nginx.conf gives the rendered file, with every path in ``folder``; and an
    access log that says which server took each model's calls."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""  # workers can read tmp
    temp = "".join(
        f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    path = folder / "nginx.conf"
    path.write_text(
        f"{user}\nworker_processes 1;\nevents {{ worker_connections 512; }}\nhttp {{\n"
        "    log_format calls '$msec|$uri|$http_clemserve_model|$upstream_addr|$status';\n"
        f"    access_log {folder / 'access.log'} calls;\n{temp}    include {site};\n}}\n"
    )
    return path


def nginx_command(folder: Path, config: Path) -> list[str]:
    return [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]


def start_nginx(folder: Path, site_text: str, port: int) -> subprocess.Popen[bytes]:
    site = folder / "clemserve.conf"
    site.write_text(site_text)
    command = [*nginx_command(folder, main_config(folder, site)), "-g", f"daemon off; pid {folder / 'nginx.pid'};"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {(folder / 'error.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"nginx not listening on {port}: {(folder / 'error.log').read_text()}")


@dataclass(frozen=True)
class Call:
    """A call as nginx's access log tells it."""

    #: when nginx finished it (time.time())
    ended: float
    #: ``/clemserve.v1.ModelService/Generate``
    path: str
    model: str
    #: the servers nginx sent it to, in order (``A, B``: A failed, B answered)
    servers: str
    status: str


def calls(access_log: Path, since: int = 0) -> list[Call]:
    """Each call nginx finished, from byte ``since`` of its log."""
    with open(access_log, "rb") as log:
        log.seek(since)
        lines = log.read().decode().splitlines()
    found = []
    for line in lines:
        ended, path, model, servers, status = line.split("|")
        found.append(Call(float(ended), path, model, servers, status))
    return found


def wait_for(process: subprocess.Popen[str], done: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two servers with the same registry (the answerer's model), which need the token."""
    folder = tmp_path_factory.mktemp("gateway-pair")
    entry = {"model_name": ANSWERER, "backend": "fault", "model_id": "fault", "model_config": {"sleep_s": 0.3}}
    (folder / "registry.json").write_text(json.dumps([entry]))
    (folder / "token").write_text(TOKEN)
    flags = ("--registry", str(folder / "registry.json"), "--auth-token-file", str(folder / "token"))
    for name in ("a", "b"):
        (folder / name).mkdir()
    with ThreadPoolExecutor(2) as starting:  # side by side: half the wait
        servers = list(starting.map(lambda name: start_server(folder / name, *flags), ("a", "b")))
    yield servers
    for proc in servers:
        if proc.process.poll() is None:
            assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, server: ServerProcess, pair: list[ServerProcess]
) -> Iterator[tuple[str, Path]]:
    """nginx on a free loopback port, rendered with the guesser's server as the default route; its address and
    access log."""
    folder = tmp_path_factory.mktemp("gateway")
    port = free_port()
    routes = [(GUESSER, (server.address,)), ("slow-*", tuple(p.address for p in pair))]
    nginx = start_nginx(folder, render_module().render(routes, (server.address,), f"127.0.0.1:{port}"), port)
    yield f"127.0.0.1:{port}", folder / "access.log"
    nginx.terminate()
    nginx.wait(timeout=10)


def test_render_routes_globs_in_order_and_encodes_names_as_the_client_does() -> None:
    from clemserve.client.calls import encode_model_name

    render = render_module()
    assert render.pattern_regex("llama-3.1-70b*") == r"~^llama\-3\.1\-70b.*$"
    assert render.pattern_regex("Löwe 7b") == "~^" + encode_model_name("Löwe 7b") + "$"
    text = render.render([("b*", ("h:2", "h:3")), ("*", ("h:1",))], ("h:1",), "127.0.0.1:9")
    assert text.index('"~^b.*$" clemserve_1;') < text.index('"~^.*$" clemserve_0;')  # first match wins
    assert "default clemserve_0;" in text and "server h:3 max_fails=1 fail_timeout=10s;" in text
    with pytest.raises(SystemExit):
        render.main(["--default", "no-port"])


def test_tls_configuration_is_valid_nginx(tmp_path: Path) -> None:
    """The TLS set-up (TLS from the clients, TLS to the servers) passes ``nginx -t`` with real certificates,
    and so does a name with nginx's escape characters; the plain-text one is the one the games below play
    through."""
    pki = make_pki(tmp_path)
    site = tmp_path / "clemserve.conf"
    site.write_text(
        render_module().render(
            [("m*", ("127.0.0.1:1", "127.0.0.1:2")), ('odd"name\\*', ("127.0.0.1:3",))],
            ("127.0.0.1:1",),
            f"127.0.0.1:{free_port()}",
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            backend_tls_ca=str(pki.ca),
            backend_tls_name="localhost",
        )
    )
    check = subprocess.run(
        [*nginx_command(tmp_path, main_config(tmp_path, site)), "-t"], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
    assert "grpc_pass grpcs://$clemserve_upstream;" in site.read_text()


def test_default_route_and_token_through_the_gateway(gateway: tuple[str, Path]) -> None:
    import clemserve.client as backends

    address, _ = gateway
    # ListModels names no model: the default route, the guesser's server
    names = {model.model_spec.model_name for model in backends.list_models(address=address, token=TOKEN)}
    assert GUESSER in names and ANSWERER not in names
    # the answerer's servers need the token: nginx passes the authorization metadata as it came
    with pytest.raises(backends.UnauthenticatedError):
        backends.get_model_for(ANSWERER, address=address).generate_response([{"role": "user", "content": "x"}])
    model = backends.get_model_for(ANSWERER, address=address, token=TOKEN)
    model.set_gen_args(max_tokens=2)
    assert model.generate_response([{"role": "user", "content": "ANSWER: no thanks"}])[2] == "ANSWER: no"


def test_a_game_across_servers_through_one_address_survives_a_replica_dying(
    gateway: tuple[str, Path], server: ServerProcess, pair: list[ServerProcess], tmp_path: Path
) -> None:
    if not (GAMES / "guesswhat").is_dir():
        pytest.fail(f"no clembench games at {GAMES}")
    address, access_log = gateway
    python = clemcore_python()
    game = shutil.copytree(GAMES / "guesswhat", tmp_path / "guesswhat")
    instances = json.loads((game / "in" / "instances.json").read_text())
    experiment = instances["experiments"][0]
    experiment.update(guesser_initial_prompt="QUESTION: Alive?", answerer_initial_prompt="ANSWER: no")
    instances["experiments"] = [experiment]
    (game / "in" / "echo.json").write_text(json.dumps(instances))
    # the entries of both servers (the pair's first as the answerer's); the run sends every call to the gateway
    setup = ["clemcore-setup", "--address", server.address, "--address", pair[0].address, "--token", TOKEN]
    done = game_side(python, [str(python.parent / "clemserve"), *setup], tmp_path)
    assert done.returncode == 0, done.stderr

    mark = access_log.stat().st_size
    run = [
        str(python.parent / "clemserve"), "run", "-g", "guesswhat", "-i", "echo", "-m", GUESSER, ANSWERER,
        "-l", "2", "-j", "2", "--address", address, "--token", TOKEN,
    ]  # fmt: skip
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    process = subprocess.Popen(run, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def answered_by_both() -> bool:
            ended = calls(access_log, mark)
            taken = {call.servers for call in ended if call.model == ANSWERER and call.path.endswith("/Generate")}
            return {p.address for p in pair} <= taken  # nginx spreads the model's generations over the pair

        wait_for(process, answered_by_both)
        pair[0].process.send_signal(signal.SIGKILL)  # one of the pair dies mid-run
        killed = time.time()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out + err
    assert f"{EPISODES} episodes: {EPISODES} played, 0 failed" in out, out + err
    episodes = sorted((tmp_path / "results").glob("*/guesswhat/Level_1/instance_*"))
    assert len(episodes) == EPISODES and all((p / "completed.json").is_file() for p in episodes)
    for episode in episodes:  # each player's answer, as the echo models give it under the game's prompts
        said = (episode / "interactions.json").read_text()
        assert "QUESTION: Alive?" in said and "ANSWER: no" in said

    routed = calls(access_log, mark)
    assert {call.servers for call in routed if call.model == GUESSER} == {server.address}, routed
    assert {call.servers for call in routed if call.model == ANSWERER} <= {
        pair[0].address,
        pair[1].address,
        f"{pair[0].address}, {pair[1].address}",  # tried the dead one, then the survivor
    }, routed
    # the answerer's generations that ended after the kill (a moment after: one the dead server had answered
    # may be logged just after it died), all answered by the survivor
    after = [call for call in routed if call.path.endswith("/Generate") and call.ended > killed + 0.1]
    generations = [call for call in after if call.model == ANSWERER]
    assert generations and all(call.servers.endswith(pair[1].address) for call in generations), routed
