"""What the Hugging Face hub says of a model repository before anything of it is downloaded: its files with
their sizes (``model_info`` with files metadata) and its ``config.json``, read into memory (the cache on disk
is left to the download). A model whose weights are neither local nor cached is estimated from these, so
that admission knows its size before its first load fetches it.

Each question is bounded by a short timeout; answers are kept for the process. A hub that does not answer
(refused, timed out, offline) is not asked again for a while, so that a listing of many models waits for it
once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec

from ..memory import Estimate, Sizing
from . import footprint
from .weights import FileChoice, cached_snapshot, model_config, transformers_files

log = logging.getLogger(__name__)

#: one question to the hub
TIMEOUT_S = 5.0
#: how long a hub that did not answer is left alone
RETRY_S = 60.0


class HubUnreachableError(OSError):
    """The hub did not answer (or was not asked: it did not answer a moment ago, or the process is offline)."""


@dataclass(frozen=True)
class Listing:
    """A repository at one commit: its files' sizes by path, and its ``config.json`` when it has one."""

    repo: str
    sha: str
    sizes: dict[str, int]
    config: dict[str, Any] | None = None

    def bytes_of(self, names: list[str]) -> int:
        return sum(self.sizes[name] for name in names)


class Hub:
    """Listings of hub repositories, kept for the process (by repository, revision, token and endpoint)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._listings: dict[tuple[str, str | None, str | None, str | None], Listing] = {}
        #: until when the hub is not asked, and why
        self._down: tuple[float, str] = (0.0, "")

    def listing(
        self, repo: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
    ) -> Listing:
        """``repo``'s files and config (``endpoint`` None: HF_ENDPOINT, as huggingface_hub reads it; ``token``
        None: the hub's own, HF_TOKEN or a saved login). HubUnreachableError where the hub does not answer;
        the hub's own errors (no such repository, no access) as they are. Blocks: call it off the event loop."""
        key = (repo, revision, token, endpoint)
        with self._lock:
            found = self._listings.get(key)
            until, why = self._down
        if found is not None:
            return found
        if offline():
            raise HubUnreachableError("the server is offline (HF_HUB_OFFLINE)")
        if self._clock() < until:
            raise HubUnreachableError(f"the hub did not answer a moment ago ({why})")
        try:
            found = _ask(repo, revision, token, endpoint)
        except Exception as exc:
            if not _answered(exc):
                with self._lock:
                    self._down = (self._clock() + RETRY_S, f"{type(exc).__name__}: {first_line(exc)}")
                raise HubUnreachableError(f"the hub did not answer: {type(exc).__name__}: {first_line(exc)}") from exc
            raise
        with self._lock:
            self._listings[key] = found
        return found


#: the process's listings
HUB = Hub()


def offline() -> bool:
    """huggingface_hub's own switch (HF_HUB_OFFLINE), read when it was imported; without huggingface_hub,
    there is no hub (the backend's load names the package to install)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def first_line(exc: BaseException) -> str:
    """An error's first line (huggingface_hub's run to a paragraph of advice)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _answered(exc: Exception) -> bool:
    """The hub answered with an error of its own (a status), or the question was not one to ask (a repository
    id it cannot take), as opposed to the hub not answering at all."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(exc, HfHubHTTPError | ValueError)


def _ask(repo: str, revision: str | None, token: str | None, endpoint: str | None) -> Listing:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(
        repo, revision=revision, files_metadata=True, token=token, timeout=TIMEOUT_S
    )
    sizes = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or ()}
    sha = str(info.sha or revision or "main")
    config = _config(repo, sha, token, endpoint) if "config.json" in sizes else None
    return Listing(repo, sha, sizes, config)


def _config(repo: str, sha: str, token: str | None, endpoint: str | None) -> dict[str, Any] | None:
    """The repository's config.json, read into memory; None where it cannot be read (a gated repository
    without a token): the estimate then goes without the KV-cache allowance."""
    from huggingface_hub import get_session, get_token, hf_hub_url

    url = hf_hub_url(repo, "config.json", revision=sha, endpoint=endpoint)
    token = token or get_token()
    try:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = get_session().get(url, headers=headers, timeout=TIMEOUT_S)
        config = response.json() if response.status_code == 200 else None
    except Exception as exc:  # the listing stands without it
        log.info("%s: config.json not read from the hub: %s", repo, first_line(exc))
        return None
    return config if isinstance(config, dict) else None


# -- the estimate ---------------------------------------------------------------------------------


def estimate(spec: ModelSpec, sizing: Sizing, hub: Hub = HUB) -> Estimate | None:
    """A transformers checkpoint's estimate before its download: the sizes of the weight files its load would
    fetch (:func:`weights.transformers_files`); ``load_in_4bit`` / ``load_in_8bit``: config.json's parameter
    count at the quantised size, as for local files; plus the KV-cache allowance from config.json. None where
    the weights are local or cached, the hub is off limits, or it cannot describe the repository: the local
    estimate stands then."""
    source = str(spec.get("huggingface_id", ""))
    config = model_config(spec)
    if not source or "gguf" in config or Path(source).is_dir() or offline() or cached_snapshot(source):
        return None
    try:
        found = hub.listing(source)
    except Exception as exc:  # unreachable, no such repository, no access: said where it matters, at load
        log.info("%s: no estimate from the hub: %s", spec.get("model_name"), first_line(exc))
        return None
    return from_listing(found, spec, sizing, transformers_files)


def from_listing(found: Listing, spec: ModelSpec, sizing: Sizing, choose: FileChoice) -> Estimate | None:
    """The estimate from a repository's listing: the weight files ``choose`` picks, else config.json."""
    hf_config = footprint.language_config(found.config or {})
    dtype_bytes = footprint.dtype_bytes(hf_config)
    config = model_config(spec)
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 0
    files = [name for name in choose(list(found.sizes)) if name.endswith(footprint.WEIGHT_SUFFIXES)]
    weights, source = found.bytes_of(files), "hub file sizes"
    if bits or not weights:  # quantised, the files' sizes say little; without files, the config is all there is
        try:
            weights = footprint.config_bytes(hf_config, dtype_bytes, bits)
        except (KeyError, TypeError, ZeroDivisionError):
            if not weights:
                return None
        else:
            source = "hub config.json" + (f", linear layers at {bits} bits" if bits else "")
    return footprint.with_kv(Estimate(weights, source=source), hf_config, dtype_bytes, spec, sizing)
