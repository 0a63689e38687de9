"""Security through real server processes: the bind check, tokens, the admin token, TLS and mutual TLS,
secrets kept out of logs and errors, and safe loading. Loopback addresses only."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import clemserve.client as backends
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.certs import Pki, make_pki
from tests.serving import ServerProcess, start_server

# random, as the README advises: the redactor scrubs every 5 characters of a token from the log, so a
# token made of words would scrub those words too
USER_TOKEN = secrets.token_urlsafe(32)
ADMIN_TOKEN = secrets.token_urlsafe(32)
WRONG_TOKEN = secrets.token_urlsafe(32)
HI = [{"role": "user", "content": "hi"}]
ECHO = pb.ModelSelector(name="echo")
#: every ModelService RPC with a request that would succeed
RPCS = {
    "Generate": pb.GenerateRequest(model=ECHO, messages=[pb.Message(role="user", content="hi")]),
    "ResolveModel": pb.ResolveModelRequest(model=ECHO),
    "ListModels": pb.ListModelsRequest(),
    "LoadModel": pb.LoadModelRequest(model=ECHO),
    "UnloadModel": pb.UnloadModelRequest(model=ECHO),
    "CountTokens": pb.CountTokensRequest(model=ECHO, messages=[pb.Message(role="user", content="hi")]),
}


def serve_command(*args: str) -> subprocess.CompletedProcess[str]:
    """A server start that must stop before binding anything."""
    return subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLEMSERVE_")},
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLEMSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "clemserve.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"]
ALL_RPCS = sorted(method.name for method in SERVICE.methods)


def call(address: str, rpc: str, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    request = RPCS.get(rpc) or getattr(pb, SERVICE.methods_by_name[rpc].input_type.name)()
    with grpc.insecure_channel(address) as channel:
        reply = getattr(pb_grpc.ModelServiceStub(channel), rpc)(request, metadata=metadata, timeout=30)
        # a streaming RPC's status comes with its first message (a lease stream may go on: one is enough)
        return next(reply, None) if SERVICE.methods_by_name[rpc].server_streaming else reply


def code_of(address: str, rpc: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        call(address, rpc, metadata)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- binding ---------------------------------------------------------------------------------------


# documentation addresses, assigned to no machine: even a broken check could not listen on them
# (tests/unit/test_auth.py checks 0.0.0.0 and :: without starting anything)
@pytest.mark.parametrize("host", ["192.0.2.10", "2001:db8::10"])
def test_non_loopback_bind_without_protection_is_refused(host: str, test_registry: Path) -> None:
    done = serve_command("--host", host, "--registry", str(test_registry))
    assert done.returncode == 2, done.stderr
    assert f"refusing to listen on {host}" in done.stderr
    assert "--auth-token" in done.stderr and "--insecure" in done.stderr


@pytest.mark.parametrize(
    "protection",
    [["--insecure"], [f"--auth-token={USER_TOKEN}"], ["--tls-cert", "server.pem", "--tls-key", "server-key.pem"]],
)
def test_protected_or_insecure_non_loopback_bind_passes_the_check(protection: list[str], tmp_path: Path) -> None:
    """Nothing binds: the start goes past the bind check and stops at the next step, a missing registry file."""
    missing = tmp_path / "missing-registry.json"
    done = serve_command("--host", "192.0.2.10", *protection, "--registry", str(missing))
    assert done.returncode == 2, done.stderr
    assert "refusing" not in done.stderr
    assert f"{missing}: file not found" in done.stderr


# -- tokens ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path) -> Iterator[ServerProcess]:
    """--auth-token-file for the user token, the admin token through its environment twin."""
    tmp = tmp_path_factory.mktemp("auth")
    token_file = tmp / "token"
    token_file.write_text(USER_TOKEN + "\n")
    proc = start_server(
        tmp,
        "--registry", str(test_registry), "--auth-token-file", str(token_file), "--log-level", "DEBUG",
        env={"CLEMSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()
    assert_no_token_in(proc.log())


def assert_no_token_in(text: str) -> None:
    for token in (USER_TOKEN, ADMIN_TOKEN):
        # neither the token nor any 8 characters of it may show
        pieces = {token[i : i + 8] for i in range(len(token) - 7)}
        assert token not in text
        assert not [p for p in pieces if p in text]


@pytest.mark.parametrize("rpc", ALL_RPCS)
@pytest.mark.parametrize(
    "metadata",
    [(), bearer(WRONG_TOKEN), (("authorization", f"Basic {USER_TOKEN}"),), (("authorization", USER_TOKEN),)],
    ids=["none", "wrong", "basic-scheme", "no-scheme"],
)
def test_missing_or_wrong_token_is_unauthenticated(auth_server: ServerProcess, rpc: str, metadata: Any) -> None:
    assert code_of(auth_server.address, rpc, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_refused_before_any_work(auth_server: ServerProcess) -> None:
    """An unauthenticated Generate on a model nobody loaded leaves it unloaded."""
    request = pb.GenerateRequest(model=pb.ModelSelector(name="tiny-llama-unload"), messages=RPCS["Generate"].messages)
    with grpc.insecure_channel(auth_server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.ModelServiceStub(channel).Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    statuses = backends.list_models(address=auth_server.address, token=USER_TOKEN)
    assert next(s for s in statuses if s.name == "tiny-llama-unload").state == "not_loaded"


def test_the_client_maps_unauthenticated(auth_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEMSERVE_TOKEN", raising=False)
    with pytest.raises(backends.UnauthenticatedError) as caught:
        backends.get_model_for("echo", address=auth_server.address)
    assert caught.value.code == "UNAUTHENTICATED" and caught.value.request_id
    with pytest.raises(backends.UnauthenticatedError):
        backends.get_model_for("echo", address=auth_server.address, token=WRONG_TOKEN)


def test_the_token_from_an_argument_connect_or_the_environment(
    auth_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLEMSERVE_TOKEN", raising=False)
    model = backends.get_model_for("echo", address=auth_server.address, token=USER_TOKEN)
    assert model.generate_response(HI)[2] == "hi"
    assert model.count_tokens(HI).prompt_tokens > 0
    assert model.generate_batch_response([HI, HI])[1][2] == "hi"
    assert USER_TOKEN not in repr(model)

    async def asynchronous() -> str:
        twin = await backends.get_async_model_for("echo", address=auth_server.address, token=USER_TOKEN)
        return (await twin.generate_response(HI))[2]

    import asyncio

    assert asyncio.run(asynchronous()) == "hi"
    assert asyncio.run(_as_async(model)) == "hi"

    backends.connect(auth_server.address, token=USER_TOKEN)
    assert backends.get_model_for("echo").generate_response(HI)[2] == "hi"
    backends.connect(auth_server.address)
    monkeypatch.setenv("CLEMSERVE_TOKEN", USER_TOKEN)
    assert backends.get_model_for("echo").generate_response(HI)[2] == "hi"


async def _as_async(model: backends.Model) -> str:
    return (await model.as_async().generate_response(HI))[2]


def test_admin_token_gates_load_and_unload(auth_server: ServerProcess) -> None:
    address = auth_server.address
    for rpc in ("LoadModel", "UnloadModel"):
        assert code_of(address, rpc, bearer(USER_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(backends.PermissionDeniedError) as caught:
        backends.preload("echo-small", address=address, token=USER_TOKEN)
    assert "admin token" in str(caught.value)
    with pytest.raises(backends.PermissionDeniedError):
        backends.unload("echo-small", address=address, token=USER_TOKEN)
    assert backends.preload("echo-small", address=address, token=ADMIN_TOKEN).state == "ready"
    assert backends.unload("echo-small", address=address, token=ADMIN_TOKEN) is True
    # the admin token opens everything else too; the user token everything but the state changes
    for rpc in sorted(RPCS):
        assert code_of(address, rpc, bearer(ADMIN_TOKEN)) == grpc.StatusCode.OK, rpc
        expected = grpc.StatusCode.PERMISSION_DENIED if rpc in ("LoadModel", "UnloadModel") else grpc.StatusCode.OK
        assert code_of(address, rpc, bearer(USER_TOKEN)) == expected, rpc


def test_health_and_reflection_need_no_token(auth_server: ServerProcess) -> None:
    with grpc.insecure_channel(auth_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert "clemserve.v1.ModelService" in names
    assert cli("health", "--address", auth_server.address).returncode == 0


def test_operator_cli_passes_the_token(auth_server: ServerProcess) -> None:
    address = auth_server.address
    refused = cli("models", "--address", address)
    assert refused.returncode == 3 and "UnauthenticatedError" in refused.stderr
    listed = cli("models", "--address", address, f"--token={USER_TOKEN}")
    assert listed.returncode == 0 and "echo-small" in listed.stdout
    said = cli("generate", "--address", address, "-m", "echo", "hello", env={"CLEMSERVE_TOKEN": USER_TOKEN})
    assert (said.returncode, said.stdout.strip()) == (0, "hello")
    denied = cli("load", "echo-small", "--address", address, f"--token={USER_TOKEN}")
    assert denied.returncode == 3 and "PermissionDeniedError" in denied.stderr
    loaded = cli("load", "echo-small", "--address", address, env={"CLEMSERVE_TOKEN": ADMIN_TOKEN})
    assert loaded.returncode == 0, loaded.stderr
    unloaded = cli("unload", "echo-small", "--address", address, f"--token={ADMIN_TOKEN}")
    assert unloaded.returncode == 0, unloaded.stderr
    for done in (refused, listed, said, denied, loaded, unloaded):
        assert_no_token_in(done.stdout + done.stderr)


def test_tokens_never_reach_errors_or_the_log(auth_server: ServerProcess) -> None:
    """A caller who puts a token in a selector gets it back scrubbed, and the log never shows one (the
    fixture scans the whole log again when the server stops)."""
    for token in (USER_TOKEN, ADMIN_TOKEN):
        with pytest.raises(backends.ModelNotFoundError) as caught:
            backends.get_model_for(f"model-{token}", address=auth_server.address, token=USER_TOKEN)
        assert_no_token_in(str(caught.value) + caught.value.selector + json.dumps(caught.value.metadata))
        assert "[redacted]" in str(caught.value)
    assert "ResolveModel -> NOT_FOUND" in auth_server.log()
    assert_no_token_in(auth_server.log())


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_credentials(pki: Pki, *, client: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client else None,
        certificate_chain=pki.client_cert.read_bytes() if client else None,
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path, pki: Pki) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("tls"),
        "--registry", str(test_registry), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        credentials=tls_credentials(pki),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path, pki: Pki) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("mtls"),
        "--registry", str(test_registry), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), f"--auth-token={USER_TOKEN}",
        credentials=tls_credentials(pki, client=True),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


def test_tls_with_the_generated_ca(tls_server: ServerProcess, pki: Pki) -> None:
    assert "(TLS, " in tls_server.log()
    address = tls_server.address
    backends.connect(address, tls_ca=pki.ca)
    assert backends.get_model_for("echo").generate_response(HI)[2] == "hi"
    port = address.rsplit(":", 1)[1]
    backends.connect(f"localhost:{port}", tls_ca=pki.ca)  # the certificate names localhost too
    assert backends.get_model_for("echo").generate_response(HI)[2] == "hi"
    backends.connect(address)


@pytest.mark.parametrize("how", ["plain-text", "system-cas", "other-ca"])
def test_tls_fails_without_the_ca(tls_server: ServerProcess, pki: Pki, how: str) -> None:
    settings: dict[str, Any] = {
        "plain-text": {"tls": False},
        "system-cas": {"tls": True},
        "other-ca": {"tls_ca": pki.other_ca},
    }[how]
    backends.connect(tls_server.address, **settings)
    try:
        with pytest.raises(backends.UnavailableError):
            backends.get_model_for("echo", timeout=10)
    finally:
        backends.connect(tls_server.address)


def test_tls_from_the_environment_in_the_cli(tls_server: ServerProcess, pki: Pki) -> None:
    env = {"CLEMSERVE_TLS_CA": str(pki.ca)}
    health = cli("health", "--address", tls_server.address, env=env)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    said = cli("generate", "--address", tls_server.address, "-m", "echo", "over", "tls", env=env)
    assert (said.returncode, said.stdout.strip()) == (0, "over tls"), said.stderr
    assert cli("health", "--address", tls_server.address).returncode == 4  # plain text gets nowhere


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    address = mtls_server.address
    assert "(mutual TLS, token required" in mtls_server.log()
    for settings in (
        {"tls_ca": pki.ca},
        {"tls_ca": pki.ca, "tls_cert": pki.stranger_cert, "tls_key": pki.stranger_key},
    ):
        backends.connect(address, token=USER_TOKEN, **settings)
        with pytest.raises(backends.UnavailableError):
            backends.get_model_for("echo", timeout=10)
    backends.connect(address, token=USER_TOKEN, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    assert backends.get_model_for("echo").generate_response(HI)[2] == "hi"
    # the certificate lets the connection in; the token is still checked
    backends.connect(address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    with pytest.raises(backends.UnauthenticatedError):
        backends.get_model_for("echo", timeout=10, token=WRONG_TOKEN)
    backends.connect(address)
    env = {
        "CLEMSERVE_TLS_CA": str(pki.ca),
        "CLEMSERVE_TLS_CERT": str(pki.client_cert),
        "CLEMSERVE_TLS_KEY": str(pki.client_key),
        "CLEMSERVE_TOKEN": USER_TOKEN,
    }
    listed = cli("models", "--address", address, env=env)
    assert listed.returncode == 0 and "echo-small" in listed.stdout, listed.stderr


@pytest.mark.parametrize("which", ["--tls-cert", "--tls-key", "--tls-client-ca"])
def test_unusable_certificate_files_stop_the_start(which: str, pki: Pki, tmp_path: Path, test_registry: Path) -> None:
    files = {"--tls-cert": str(pki.server_cert), "--tls-key": str(pki.server_key), "--tls-client-ca": str(pki.ca)}
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for bad, problem in ((str(tmp_path / "missing.pem"), "cannot read the file"), (str(not_pem), "not a PEM file")):
        args = [part for flag, path in {**files, which: bad}.items() for part in (flag, path)]
        done = serve_command("--registry", str(test_registry), *args)
        assert done.returncode == 2, done.stderr
        assert f"{which} {bad}: {problem}" in done.stderr


# -- safe loading ----------------------------------------------------------------------------------

FORBIDDEN = [
    ({"model_name": "echo-small", "huggingface_id": "someone/evil-model"}, "huggingface_id"),
    ({"model_name": "echo-small", "base_url": "http://203.0.113.7/v1"}, "base_url"),
    ({"model_name": "tiny-llama", "model_config": {"trust_remote_code": True}}, "model_config.trust_remote_code"),
    ({"model_name": "tiny-llama", "model_config": {"peft_model": "/data/adapter"}}, "model_config.peft_model"),
    ({"model_name": "echo-small", "model_config": {"gguf": {"file": "x.gguf"}}}, "model_config.gguf.file"),
    ({"model_name": "echo-small", "model_config": {"custom_chat_template": "{{ 1 }}"}},
     "model_config.custom_chat_template"),
    ({"model_name": "tiny-llama", "model_config": {"vllm_args": {"max_model_len": 64}}},
     "model_config.vllm_args.max_model_len"),
    ({"model_name": "echo-small", "model_config": {"cache_dir": "/data/elsewhere"}}, "model_config.cache_dir"),
    ({"model_name": "tiny-llama", "tokenizer_path": "/etc"}, "tokenizer_path"),
]  # fmt: skip


@pytest.mark.parametrize(("selector", "field"), FORBIDDEN, ids=[f for _, f in FORBIDDEN])
def test_selectors_cannot_add_what_loads_code_or_files(client: Any, selector: dict[str, Any], field: str) -> None:
    with pytest.raises(client.PermissionDeniedError) as caught:
        client.get_model_for(selector)
    assert f"model.spec.{field}" in str(caught.value)
    assert caught.value.metadata["field"] == f"model.spec.{field}"
    for rpc, request in (
        ("Generate", pb.GenerateRequest(messages=RPCS["Generate"].messages)),
        ("LoadModel", pb.LoadModelRequest()),
    ):
        request.model.spec.json = json.dumps(selector)
        with grpc.insecure_channel(client.default_address()) as channel, pytest.raises(grpc.RpcError) as raw:
            getattr(pb_grpc.ModelServiceStub(channel), rpc)(request, timeout=30)
        assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_narrowing_selectors_still_work(client: Any) -> None:
    model = client.get_model_for("tiny-llama")  # every later call sends the whole resolved entry back
    model.set_gen_args(temperature=0.0, max_tokens=4)
    assert isinstance(model.generate_response(HI)[2], str)
    narrowed = client.get_model_for({"model_name": "echo-small", "context_size": "64", "temperature": 0.5})
    narrowed.set_gen_args(temperature=0.0, max_tokens=8)
    assert narrowed.generate_response(HI)[2] == "hi"


@pytest.mark.parametrize(
    "backend", ["../evil", "evil", "os:system", "clemserve.service.backends.echo:EchoBackend", "/data/evil.py"]
)
def test_a_selector_cannot_name_backend_code(client: Any, backend: str) -> None:
    with pytest.raises(client.ModelNotFoundError):  # every entry has its own backend: no entry unifies
        client.get_model_for({"model_name": "echo-small", "backend": backend})


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path) -> Iterator[ServerProcess]:
    """--allow-client-specs, and a registry entry whose backend names a module in the server's directory."""
    tmp = tmp_path_factory.mktemp("open")
    marker = tmp / "imported"
    (tmp / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Backend: pass\n")
    registry = tmp / "evil_registry.json"
    registry.write_text(
        json.dumps(
            [
                {"model_name": "evil-module", "backend": "evil"},
                {"model_name": "evil-class", "backend": "evil:Backend"},
            ]
        )
    )
    proc = start_server(tmp, "--registry", str(registry), "--registry", str(test_registry), "--allow-client-specs")
    yield proc
    assert proc.stop() == 0, proc.log()
    assert not marker.exists()


def test_allow_client_specs(open_server: ServerProcess) -> None:
    assert "client specs allowed" in open_server.log()
    backends.connect(open_server.address)
    for selector, _ in FORBIDDEN:
        if selector["model_name"] == "echo-small":  # echo loads nothing, so the load itself is harmless
            model = backends.get_model_for(selector)
            model.set_gen_args(temperature=0.0, max_tokens=8)
            assert model.generate_response(HI)[2] == "hi"
    with pytest.raises(backends.ModelNotFoundError):
        backends.get_model_for({"model_name": "echo-small", "backend": "../evil"})


@pytest.mark.parametrize("name", ["evil-module", "evil-class"])
def test_backend_code_never_comes_from_the_working_directory(open_server: ServerProcess, name: str) -> None:
    """The server runs in a directory holding evil.py (``python -m`` puts it on sys.path): a registry
    backend naming it is an unknown backend, and evil.py is never imported (checked when the server stops)."""
    with pytest.raises(backends.FailedPreconditionError) as caught:
        backends.preload(name, address=open_server.address)
    assert "unknown backend" in str(caught.value)
