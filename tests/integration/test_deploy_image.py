"""The container images, without a container runtime: ``deploy/Dockerfile``'s build steps run here as written,
in a copy of the build context that ``.dockerignore`` lets through, and its runtime stage is then played as
``docker run`` would: its environment, its entry point and command, its health check, SIGTERM to stop.
``deploy/Dockerfile.cuda`` cannot be installed here (CUDA wheels): its steps are expanded with ``make -n``
and its runtime stage checked like the CPU image's.

The build is cached as a container runtime caches layers, in ``~/.cache/clemserve/deploy-image`` (outside
the checkout, as the Makefile keeps llama.cpp's wheels, so that later checkouts and CI on the same machine
reuse it): the environment is keyed by what decides its dependencies (the install steps as make expands them,
pyproject.toml's dependencies and extras, the Python version), the prepared model by that key, the prepare
step and the conversion code. Every step runs on every test run, on the layers kept; a key that changed, or
a step that failed, starts from nothing (a fresh virtual environment, an empty cache directory), as does a
new machine: about 3 minutes of CPU (torch, some 80 packages, the conversion).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serving import REPO, free_port

DOCKERFILES = {"cpu": REPO / "deploy" / "Dockerfile", "cuda": REPO / "deploy" / "Dockerfile.cuda"}
MANIFEST = REPO / "deploy" / "kubernetes.yaml"
LAYERS = Path.home() / ".cache" / "clemserve" / "deploy-image"
DEMO = "smollm2-135m-instruct"
COMPLETE = ".image-layer-complete"
VERSION = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[0]  # the project's


# --- reading a Dockerfile -------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, its arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.steps if name == instruction]

    def one(self, instruction: str) -> str:
        (args,) = self.all(instruction)
        return args

    def env(self) -> dict[str, str]:
        pairs = [shlex.split(args) for args in self.all("ENV")]
        assert all("=" in pair for line in pairs for pair in line), "ENV in its KEY=VALUE form only"
        return dict(pair.split("=", 1) for line in pairs for pair in line)

    def make_steps(self) -> list[list[str]]:
        """The RUN lines that are make commands, split as the shell would."""
        return [shlex.split(args) for args in self.all("RUN") if args.startswith("make ")]


def read_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), " ".join(args.split())
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base, name or None))
        else:
            assert stages, f"{path.name}: {instruction} before FROM"
            stages[-1].steps.append((instruction, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON array (exec form: no shell between the container runtime and the program)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def make_variables(step: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in step[1:] if "=" in arg)


# --- the build context ----------------------------------------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: ``**`` any directories, ``*`` and ``?`` within one."""
    assert "[" not in text and "\\" not in text, f"{text}: character classes and escapes are not read here"
    regex, rest = "", os.path.normpath(text).lstrip("/")
    while rest:
        if rest.startswith("**/"):
            regex, rest = regex + "(?:.*/)?", rest[3:]
        elif rest.startswith("**"):
            regex, rest = regex + ".*", rest[2:]
        else:
            regex, rest = regex + {"*": "[^/]*", "?": "[^/]"}.get(rest[0], re.escape(rest[0])), rest[1:]
    return re.compile(regex)


def build_context(root: Path) -> list[str]:
    """The files a build of ``root`` receives: a path is left out when the last pattern matching it or one of
    its parent folders is not a ``!`` exception."""
    rules = [
        (line.startswith("!"), line.lstrip("!"))
        for line in (raw.strip() for raw in (root / ".dockerignore").read_text().splitlines())
        if line and not line.startswith("#")
    ]
    compiled = [(keep, _pattern(text)) for keep, text in rules]

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for keep, pattern in compiled:
            if any(pattern.fullmatch(prefix) for prefix in prefixes):
                verdict = not keep
        return verdict

    exceptions = [text for keep, text in rules if keep]
    files: list[str] = []
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel + "/"
        # an excluded folder is not walked unless an exception may reach inside it
        dirs[:] = [
            d for d in dirs if not excluded(prefix + d) or any(e.startswith(prefix + d + "/") for e in exceptions)
        ]
        files += [prefix + name for name in names if not excluded(prefix + name)]
    return sorted(files)


# --- the build, as layers -------------------------------------------------------------------------------------


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _dry_run(step: list[str], cwd: Path, **variables: str) -> str:
    """What make would run for a step, with the test's variables after the Dockerfile's (the later wins)."""
    overrides = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(
        [*step, "-n", "--no-print-directory", *overrides], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


@dataclass
class Image:
    runtime: Stage
    paths: dict[str, Path]  # a path in the image -> where it is here
    timings: dict[str, float]
    fresh: dict[str, bool]  # which layers were built from nothing

    def here(self, value: str) -> str:
        for inside, outside in self.paths.items():
            value = value.replace(inside, str(outside))
        return value


def _dependencies(pyproject: Path) -> str:
    """What of pyproject.toml decides the environment: the build system, the dependencies and the extras."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the whole file
        return pyproject.read_text()
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    return json.dumps([data["build-system"], project["dependencies"], project["optional-dependencies"]])


def _build_env() -> dict[str, str]:
    # this machine's pip settings stay (where torch lies on disk); the server's own settings do not: a build
    # has none but those the Dockerfile gives
    return {k: v for k, v in os.environ.items() if not k.startswith(("CLEMSERVE_", "HF_"))}


def _prune(keep: set[Path]) -> None:
    for old in LAYERS.iterdir():
        if old.is_dir() and old not in keep:
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """deploy/Dockerfile's build stage, step by step: COPY into the work folder, RUN each make line there
    (the image's environment and cache directory in the layer store), then the runtime stage's paths."""
    build, runtime = read_dockerfile(DOCKERFILES["cpu"])
    context_files = build_context(REPO)
    work = tmp_path_factory.mktemp("image") / "src"
    work.mkdir()
    steps = build.make_steps()
    venv_in_image = make_variables(steps[0])["IMAGE_VENV"]
    cache_in_image = make_variables(steps[-1])["IMAGE_CACHE_DIR"]
    LAYERS.mkdir(parents=True, exist_ok=True)
    with open(LAYERS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this test waits; the layers are shared
        # the keys: the steps as make expands them, with placeholders where the layer paths go
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy2(REPO / name, work / name)
        placeholders = {"IMAGE_VENV": "VENV", "IMAGE_CACHE_DIR": "CACHE", "TORCH_INDEX": ""}
        expanded = [_dry_run(step, work, **placeholders) for step in steps]
        install_steps = [text for step, text in zip(steps, expanded, strict=True) if "image-prepare" not in step]
        env_key = _digest(sys.version, _dependencies(work / "pyproject.toml"), *install_steps)
        prepare_key = _digest(env_key, *expanded, (REPO / "service" / "backends" / "gguf.py").read_bytes())
        venv, cache = LAYERS / f"venv-{env_key}", LAYERS / f"cache-{prepare_key}"
        _prune({venv, cache})
        for layer in (venv, cache):
            if not (layer / COMPLETE).exists():  # a build that stopped half-way starts again from nothing
                shutil.rmtree(layer, ignore_errors=True)
        fresh = {name: not (layer / COMPLETE).exists() for name, layer in (("env", venv), ("cache", cache))}
        for layer in (venv, cache):
            (layer / COMPLETE).unlink(missing_ok=True)  # set again once every step has passed
        for path in (work / "Makefile", work / "pyproject.toml"):
            path.unlink()
        layers = {"IMAGE_VENV": str(venv), "IMAGE_CACHE_DIR": str(cache), "TORCH_INDEX": ""}
        timings: dict[str, float] = {}
        env = {**_build_env(), **{k: v for k, v in build.env().items() if not k.startswith("PIP_")}}
        for instruction, args in build.steps:
            if instruction == "WORKDIR":
                assert args == "/src", "the build's work folder: the steps below run in this test's copy of it"
            elif instruction == "COPY":
                *sources, destination = shlex.split(args)
                assert destination == "./" and not any(s.startswith("--") for s in sources), args
                for name in context_files:
                    if "." in sources or name in sources:
                        (work / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(REPO / name, work / name)
            elif instruction == "RUN" and args.startswith("make "):
                step = shlex.split(args)
                started = time.monotonic()
                run = subprocess.run(
                    [*step, "--no-print-directory", *(f"{k}={v}" for k, v in layers.items()),
                     f"IMAGE_PYTHON={sys.executable}"],
                    cwd=work, env=env, capture_output=True, text=True, timeout=1800,
                )  # fmt: skip
                timings[" ".join(step[:2])] = time.monotonic() - started
                assert run.returncode == 0, f"{args}:\n{run.stdout}\n{run.stderr}"
                if step[1] == "image-prepare" and fresh["cache"]:
                    assert f"once into {cache}/gguf/" in run.stdout + run.stderr, "converted into IMAGE_CACHE_DIR"
            elif instruction == "RUN":
                assert args.startswith("apt-get update"), f"a build step that is not a make target: {args}"
        assert (venv / "bin" / "clemserve").exists(), "image-install put clemserve in IMAGE_VENV"
        assert list((cache / "gguf").glob("*/.clemserve-prepared")), "image-prepare left the demo in the cache"
        for layer in (venv, cache):
            (layer / COMPLETE).touch()
        yield Image(runtime, {venv_in_image: venv, cache_in_image: cache}, timings, fresh)


# --- the tests ------------------------------------------------------------------------------------------------


def test_build_context_holds_the_source_and_leaves_out_the_rest() -> None:
    files = build_context(REPO)
    for needed in ("Makefile", "pyproject.toml", "README.md", "service/server.py", "registry/model_registry.json"):
        assert needed in files, needed
    assert "proto/clemserve/v1/clemserve_pb2.py" in files
    for left_out in (".git/", ".venv/", ".cache/", "tests/", "bench/", "dist/", "build/"):
        assert not any(name.startswith(left_out) for name in files), left_out
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in files)
    assert sum((REPO / name).stat().st_size for name in files) < 5 * 2**20


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_build_steps_are_the_makefiles_targets(variant: str, tmp_path: Path) -> None:
    build, runtime = read_dockerfile(DOCKERFILES[variant])
    steps = build.make_steps()
    assert [step[1] for step in steps] == ["image-torch", "image-install", "image-prepare"]
    assert all(args.startswith(("make ", "apt-get update")) for args in build.all("RUN"))
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    expanded = {step[1]: _dry_run(step, tmp_path) for step in steps}
    venv = make_variables(steps[0])["IMAGE_VENV"]
    assert all(make_variables(step)["IMAGE_VENV"] == venv for step in steps)
    assert f"{venv}/bin/python -m pip install" in expanded["image-torch"]
    assert f"{venv}/bin/python -m pip install" in expanded["image-install"]
    cache = make_variables(steps[-1])["IMAGE_CACHE_DIR"]
    assert f"{venv}/bin/clemserve prepare {DEMO} --cache-dir {cache}" in expanded["image-prepare"]
    if variant == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in expanded["image-torch"]
        assert '".[server,hf,remote]"' in expanded["image-install"]
    else:
        assert "/whl/cpu" not in expanded["image-torch"]  # PyPI's torch: the CUDA build
        assert '".[server,remote,vllm]" vllm==' in expanded["image-install"]
    # the runtime stage takes what those steps built
    copied = [shlex.split(args) for args in runtime.all("COPY")]
    assert [c[-2:] for c in copied] == [[venv, venv], [cache, cache]]
    assert all(f"--from={build.name}" in c for c in copied)


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_runtime_stage_is_non_root_with_the_cache_a_volume(variant: str) -> None:
    build, runtime = read_dockerfile(DOCKERFILES[variant])
    venv = make_variables(build.make_steps()[0])["IMAGE_VENV"]
    env = runtime.env()
    uid, _, gid = runtime.one("USER").partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    assert f"--uid {uid}" in runtime.one("RUN")
    assert exec_form(runtime.one("VOLUME")) == [env["CLEMSERVE_CACHE_DIR"]]
    assert env["HF_HOME"].startswith(env["CLEMSERVE_CACHE_DIR"] + "/")
    assert f"--chown={uid}:{gid} {env['CLEMSERVE_CACHE_DIR']}" in " ".join(runtime.all("COPY"))
    assert runtime.one("EXPOSE") == env["CLEMSERVE_PORT"]
    assert env["CLEMSERVE_ADDRESS"] == f"127.0.0.1:{env['CLEMSERVE_PORT']}"
    assert env["PATH"].startswith(f"{venv}/bin:")
    # SIGTERM reaches the server: tini hands it on, no shell in between; the health check is clemserve's
    assert exec_form(runtime.one("ENTRYPOINT")) == ["/usr/bin/tini", "--", f"{venv}/bin/clemserve"]
    assert exec_form(runtime.one("CMD")) == ["serve"]
    options, _, command = runtime.one("HEALTHCHECK").partition(" CMD ")
    assert exec_form(command) == [f"{venv}/bin/clemserve", "health"]
    assert "--interval=" in options and "--start-period=" in options


def test_manifest_runs_the_image_as_it_is_built() -> None:
    yaml = pytest.importorskip("yaml")
    build, runtime = read_dockerfile(DOCKERFILES["cpu"])
    venv = make_variables(build.make_steps()[0])["IMAGE_VENV"]
    env = runtime.env()
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"clemserve:{VERSION}"
    assert container["args"][0] == "serve"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == [f"{venv}/bin/clemserve", "health"], probe
        assert f"--address=127.0.0.1:{env['CLEMSERVE_PORT']}" in command, probe
    port = next(a for a in container["args"] if a.startswith("--port="))
    assert port == f"--port={env['CLEMSERVE_PORT']}"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env["CLEMSERVE_CACHE_DIR"] in mounts
    uid, _, gid = runtime.one("USER").partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["fsGroup"] == int(gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the documentation's page on deploying (docs/deploy.md) builds the images as the Dockerfiles say
    page = (REPO / "docs" / "deploy.md").read_text()
    for variant, tag in (("cpu", VERSION), ("cuda", f"{VERSION}-cuda")):
        command = f"docker build -f {DOCKERFILES[variant].relative_to(REPO)} -t clemserve:{tag} ."
        assert command in page and command in DOCKERFILES[variant].read_text(), command


@pytest.mark.demo
@pytest.mark.timeout(1800)  # a build from nothing: several minutes on two busy cores
def test_image_serves_the_demo_model_offline_and_stops_on_sigterm(image: Image, tmp_path: Path) -> None:
    """``docker run IMAGE`` played here: the runtime stage's environment and working folder, its entry point
    (less tini) and command; the network closed to the server; its health check until SERVING; a call to the
    demo model through the image's own client; SIGTERM; exit 0."""
    runtime = image.runtime
    entrypoint = [image.here(a) for a in exec_form(runtime.one("ENTRYPOINT"))]
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]
    argv = entrypoint[2:] + exec_form(runtime.one("CMD"))
    port = free_port()
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    token = "deploy-test-token"
    container_env = {k: image.here(v) for k, v in runtime.env().items()}
    # what `docker run -e` would set: a port of this test's own, bound on loopback here, and the token the
    # image's 0.0.0.0 would need
    container_env |= {
        "HOME": str(workdir),
        "CLEMSERVE_HOST": "127.0.0.1",
        "CLEMSERVE_PORT": str(port),
        "CLEMSERVE_ADDRESS": f"127.0.0.1:{port}",
    }
    # no way out for the server: any download it tried would fail
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}
    health = [image.here(a) for a in exec_form(runtime.one("HEALTHCHECK").partition(" CMD ")[2])]
    log_path = tmp_path / "server.log"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            argv,
            cwd=workdir,
            env={**container_env, **offline, "CLEMSERVE_AUTH_TOKEN": token},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            check = subprocess.run(health, env=container_env, capture_output=True, text=True, timeout=30)
            if check.returncode == 0 or server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert check.returncode == 0, f"{check.stdout}{check.stderr}\n{log_path.read_text()}"
        assert check.stdout == f"127.0.0.1:{port}: SERVING\n"
        serving = time.monotonic() - started
        said = subprocess.run(
            [*argv[:1], "generate", "-m", DEMO, "-l", "20", "What is the capital of France?"],
            env={**container_env, "CLEMSERVE_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert said.returncode == 0, said.stderr + log_path.read_text()
        assert "Paris" in said.stdout
        answered = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    log = log_path.read_text()
    assert code == 0, log
    assert f"loading {DEMO}: ready" in log
    assert "once into" not in log, "the demo model was converted at run time, not at build time"
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in image.timings.items())
    print(f"\nbuild steps (fresh layers: {image.fresh}): {steps}")
    print(f"run: SERVING after {serving:.1f} s, the demo's answer after {answered:.1f} s")
