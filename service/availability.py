"""Whether a registry entry can run on this server, found without loading it (ListModels' availability).

Reads the file system (installed packages, the Hugging Face cache, key entries) but imports no backend and
no SDK, so it is cheap enough for every ListModels; the model cache calls it off the event loop. The first
thing missing wins, in the order a load would meet it: a backend not served, a package, a GPU, a key, the
weights. Each backend's ``load`` checks the same things again and says so in its error.

Weights that are neither local nor cached "can load" only where the server is online and the hub said it
has them: :class:`HubProbe` asks it once per repository and process, all repositories of a listing at once,
each question bounded by a short timeout, so that a model the hub cannot deliver is not shown as loadable.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ClemserveError
from clemserve.registry.keys import ENVIRONMENT_KEYS

from .backends import Weights, install_route, key_entry, locate_weights, requirements
from .backends.weights import SnapshotFinder, cached_snapshot
from .domain import Availability

#: model_config flags that load the model through bitsandbytes, which needs a CUDA GPU
_GPU_FLAGS = ("load_in_8bit", "load_in_4bit")


def _has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


@dataclass(frozen=True)
class HubAnswer:
    """What the hub said of a repository: ``found`` it has it; ``detail`` the words for ListModels."""

    found: bool
    detail: str


def _hub_endpoint() -> str:
    """The hub that downloads would use (HF_ENDPOINT, as huggingface_hub reads it)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return str(constants.ENDPOINT).rstrip("/")


class HubProbe:
    """Asks the Hugging Face hub whether it has a repository (``GET {endpoint}/api/models/{repo}``), each
    question bounded by ``timeout_s``. An answer (found, not found, refused) is kept for the process; a hub
    that did not answer is not asked again for ``retry_s``, and every repository not answered yet reads as
    unreachable meanwhile. Thread-safe; it blocks, so callers ask off the event loop."""

    def __init__(
        self,
        endpoint: Callable[[], str] = _hub_endpoint,
        timeout_s: float = 2.0,
        retry_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint
        self.timeout_s = timeout_s
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, bool], HubAnswer] = {}
        #: until when the hub counts as unreachable, and why
        self._down: tuple[float, str] = (0.0, "")

    def known(self, repo: str, token: str | None = None) -> HubAnswer | None:
        """The answer for ``repo`` without asking: kept, or the hub's being unreachable; None: not asked."""
        with self._lock:
            answer = self._answers.get((repo, token is not None))
            until, why = self._down
            if answer is None and self._clock() < until:
                return self._unreachable(repo, why)
            return answer

    def answer(self, repo: str, token: str | None = None) -> HubAnswer:
        self.ask([repo], token)
        answer = self.known(repo, token)
        assert answer is not None
        return answer

    def ask(self, repos: Iterable[str], token: str | None = None) -> None:
        """Ask about every repository of ``repos`` not answered yet, all at once."""
        unasked = [repo for repo in dict.fromkeys(repos) if self.known(repo, token) is None]
        if not unasked:
            return
        endpoint = self._endpoint()
        with ThreadPoolExecutor(max_workers=min(16, len(unasked)), thread_name_prefix="hub-probe") as pool:
            answers = list(pool.map(lambda repo: self._ask_one(endpoint, repo, token), unasked))
        with self._lock:
            for repo, (answer, down) in zip(unasked, answers, strict=True):
                if down:
                    self._down = (self._clock() + self._retry_s, down)
                else:
                    assert answer is not None
                    self._answers[(repo, token is not None)] = answer

    def _unreachable(self, repo: str, why: str) -> HubAnswer:
        return HubAnswer(
            False,
            f"{repo} is not in the server's Hugging Face cache and the hub {self._endpoint()} did not answer "
            f"({why}; each question waits {self.timeout_s:g} s)",
        )

    def _ask_one(self, endpoint: str, repo: str, token: str | None) -> tuple[HubAnswer | None, str]:
        """(the answer, "") or (None, why the hub did not answer)."""
        url = f"{endpoint}/api/models/{urllib.parse.quote(repo, safe='/')}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            return _refusal(endpoint, repo, exc.code, token is not None)
        except (OSError, ValueError) as exc:  # refused, timed out, no route, a malformed endpoint
            reason = getattr(exc, "reason", exc)
            return None, str(reason) or type(reason).__name__
        return HubAnswer(True, f"the first load downloads {repo} from the Hugging Face hub"), ""


def _refusal(endpoint: str, repo: str, status: int, with_token: bool) -> tuple[HubAnswer | None, str]:
    if status == 404:
        return HubAnswer(False, f"{repo} is neither in the server's Hugging Face cache nor on the hub {endpoint}"), ""
    if status in (401, 403):
        key = "refused the server's `huggingface` key" if with_token else "needs a key"
        return (
            HubAnswer(
                False,
                f"the hub {endpoint} answered {status} for {repo}: it does not exist, or it is private or gated "
                f"and {key} (model_config.requires_api_key sends the server's `huggingface` key)",
            ),
            "",
        )
    return None, f"it answered {status}"


class Hub(Protocol):
    def answer(self, repo: str, token: str | None = None) -> HubAnswer: ...


@dataclass(frozen=True)
class Machine:
    """What this server has, as the check sees it; the defaults look at the real machine."""

    keys: KeyRegistry
    has_gpu: bool
    #: the Hugging Face hub is off limits (the server runs without --online): weights not cached cannot come
    offline: bool
    has_package: Callable[[str], bool] = _has_package
    #: the folder of a hub id's cached snapshot with its config and weights, or None
    cached_snapshot: SnapshotFinder = cached_snapshot
    #: asks an online server's hub about weights not cached (None: nobody asks, they cannot load)
    hub: Hub | None = None


def availability_of(specs: Sequence[ModelSpec], machine: Machine) -> list[tuple[Availability, str]]:
    """:func:`availability` of every entry; the hub is asked about all the repositories not cached at once
    (blocking: off the event loop)."""
    if isinstance(machine.hub, HubProbe) and not machine.offline:
        asked = _Unasked(machine.hub)
        for spec in specs:
            availability(spec, replace(machine, hub=asked))
        for token, repos in asked.repos.items():
            machine.hub.ask(repos, token)
    return [availability(spec, machine) for spec in specs]


class _Unasked:
    """A first pass's hub: answers from what the probe knows, and collects what it would have to ask."""

    def __init__(self, hub: HubProbe) -> None:
        self.hub = hub
        self.repos: dict[str | None, list[str]] = {}

    def answer(self, repo: str, token: str | None = None) -> HubAnswer:
        known = self.hub.known(repo, token)
        if known is None:
            self.repos.setdefault(token, []).append(repo)
            return HubAnswer(False, "")
        return known


def availability(spec: ModelSpec, machine: Machine) -> tuple[Availability, str]:
    """Whether ``spec`` can load here and, when not, what is missing in words (or what its load does first)."""
    backend = str(spec.get("backend", ""))
    try:
        needs = requirements(backend)
    except ClemserveError as exc:
        return Availability.NOT_SERVED, exc.message
    config = spec.get("model_config") or {}
    if not isinstance(config, dict):
        config = {}
    missing = [name for name in needs.packages if not machine.has_package(name)]
    if missing:
        return Availability.NEEDS_EXTRA, f"{install_route(needs.extra)} (missing: {', '.join(missing)})"
    for flag in _GPU_FLAGS:
        if config.get(flag):
            if not machine.has_gpu:
                return Availability.NEEDS_GPU, f"model_config.{flag} needs a CUDA GPU (bitsandbytes)"
            if not machine.has_package("bitsandbytes"):
                return Availability.NEEDS_EXTRA, f"model_config.{flag} needs pip install bitsandbytes"
    if config.get("peft_model") and not machine.has_package("peft"):
        return Availability.NEEDS_EXTRA, "model_config.peft_model needs pip install peft"
    attention = str(config.get("attn_implementation") or "")
    if attention.startswith("flash_attention") and not machine.has_package("flash_attn"):
        return Availability.NEEDS_EXTRA, f"model_config.attn_implementation {attention} needs pip install flash-attn"
    key = key_entry(spec)
    if needs.weights and config.get("requires_api_key"):
        key = "huggingface"
    if key:
        found = _key_problem(machine.keys, key)
        if found:
            return Availability.NEEDS_KEY, found
    located = locate_weights(spec, machine.cached_snapshot) if needs.weights else None
    if located is None:
        return Availability.CAN_LOAD, ""
    token = machine.keys.get_key_for("huggingface")["api_key"] if config.get("requires_api_key") else None
    return _weights(located, machine, token)


def _key_problem(keys: KeyRegistry, name: str) -> str:
    if name not in keys:
        source = ENVIRONMENT_KEYS.get(name)
        unset = f" and {' or '.join(source.api_key)} is not set" if source else ""
        return f"the server's key.json has no `{name}` entry{unset}"
    if not keys.get_key_for(name).has_api_key():
        return f"the server's key.json entry '{name}' has no api_key"
    return ""


def _weights(found: Weights, machine: Machine, token: str | None) -> tuple[Availability, str]:
    if found.unservable:
        return Availability.NOT_SERVED, found.missing
    if found.found:
        return Availability.CAN_LOAD, ""
    if not found.download:
        return Availability.NEEDS_WEIGHTS, found.missing
    if machine.offline:
        return (
            Availability.NEEDS_WEIGHTS,
            f"{found.source} is not in the server's Hugging Face cache and the server is offline "
            "(serve with --online to download it, or download it into that cache first)",
        )
    if machine.hub is None:
        return Availability.NEEDS_WEIGHTS, f"{found.source} is not in the server's Hugging Face cache"
    answer = machine.hub.answer(found.source, token)
    return (Availability.CAN_LOAD if answer.found else Availability.NEEDS_WEIGHTS), answer.detail


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits to this process, as huggingface_hub itself reads it (the
    server's ``main`` sets HF_HUB_OFFLINE from --online before anything imports it)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)
