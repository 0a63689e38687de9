"""The download phase of a load: weights that are neither local nor cached come down from the Hugging Face
hub before the backend builds the model, so that --load-timeout bounds the load and not the network.

The files are those the backend's load would read (the catalog's ``weights`` function says which:
:attr:`Weights.fetch`), fetched into the hub's cache with ``snapshot_download``, where the backend then
finds them. The download runs in a thread of its own; the event loop watches the repository's folder in the
cache grow and reports bytes done of the total the hub listed. A download that gains no byte for
``stall_s`` seconds fails (its thread is left to end on huggingface_hub's own timeout); otherwise it has no
bound. Where the hub cannot describe the repository, or the download fails, the phase steps aside and the
backend's load tries, as before, and says why it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import UnavailableError

from .hub import HUB, Hub, Listing, first_line
from .weights import FileChoice, model_config

log = logging.getLogger(__name__)

#: the share of a load's progress (0 to 1) that its download takes; the backend reports from there on
SHARE = 0.3
#: how often the download's bytes are read, and how often a line is logged
POLL_S, LOG_EVERY_S = 0.5, 10.0

#: told a line and the load's fraction done while the download runs
Report = Callable[[str, float], None]


class DownloadStalledError(UnavailableError):
    """A download gained no byte for --download-stall-timeout seconds. UNAVAILABLE: a later try resumes it."""

    reason = "DOWNLOAD_STALLED"


def hub_token(spec: ModelSpec, keys: KeyRegistry) -> str | None:
    """The key a download sends: the server's ``huggingface`` key where the entry sets ``requires_api_key``
    (as the transformers backends do when they load), else the hub's own (HF_TOKEN or a saved login)."""
    if not model_config(spec).get("requires_api_key"):
        return None
    return str(keys.get_key_for("huggingface")["api_key"]) or None


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


async def fetch(
    repo: str,
    choose: FileChoice,
    report: Report,
    *,
    stall_s: float,
    token: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    hub: Hub = HUB,
) -> Path | None:
    """Download the files of ``repo`` that ``choose`` picks into the hub's cache (``cache_dir`` None: the
    default, HF_HUB_CACHE), telling ``report`` how far it is. The snapshot's folder; None where the hub cannot
    describe the repository or the download failed (logged: the backend's load tries and says why).
    DownloadStalledError when no byte arrives for ``stall_s`` seconds (0 or less: never)."""
    try:
        found = await asyncio.to_thread(hub.listing, repo, revision=revision, token=token, endpoint=endpoint)
    except Exception as exc:  # unreachable, no such repository, no access: the backend's load says so
        log.info("not downloading %s before its load: %s", repo, first_line(exc))
        return None
    files = choose(list(found.sizes))
    folder = Path(cache_dir) if cache_dir is not None else _default_cache()
    download = _Download(found, files, folder / f"models--{repo.replace('/', '--')}" / "blobs")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()

    def run() -> None:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                repo,
                revision=revision,  # a branch's name is kept in the cache's refs, for offline loads after
                allow_patterns=files,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
                tqdm_class=_quiet_bars(),
            )
        except BaseException as exc:  # handed to the event loop, which decides
            _settle(loop, done, None, exc)
        else:
            _settle(loop, done, path, None)

    # a thread of its own, not the loop's executor: a stalled one must not hold up the server's shutdown
    threading.Thread(target=run, name=f"download {repo}", daemon=True).start()
    report(download.line(0), 0.0)
    log.info("downloading %s (%d files, %s) from the Hugging Face hub", repo, len(files), mib(download.total))
    await download.watch(done, report, stall_s)
    try:
        path = Path(done.result())
    except Exception as exc:
        log.warning("downloading %s failed (the load goes on without it): %s", repo, first_line(exc))
        return None
    report(f"downloaded {repo}: {mib(download.total)}", SHARE)
    log.info("downloaded %s: %s in %.1f s", repo, mib(download.total), time.monotonic() - download.started)
    return path


def _quiet_bars() -> Any:
    """huggingface_hub's progress bars, silent: the server's log says how far a download is, at its pace."""
    from huggingface_hub.utils.tqdm import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})  # type: ignore[no-untyped-call]

    return Quiet


def _default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _settle(
    loop: asyncio.AbstractEventLoop, done: asyncio.Future[str], path: str | None, exc: BaseException | None
) -> None:
    """Hand the download thread's outcome to the event loop (a stalled download's, later, to no one)."""

    def settle() -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
            done.exception()  # read: a stalled download's late failure is nobody's to log
        else:
            done.set_result(str(path))

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (a stalled download, ended later)
        loop.call_soon_threadsafe(settle)


class _Download:
    """One download's bytes, read from the repository's blobs in the cache (finished and ``.incomplete``)."""

    def __init__(self, found: Listing, files: list[str], blobs: Path) -> None:
        self.repo, self.blobs = found.repo, blobs
        self.total = found.bytes_of(files)
        self.started = time.monotonic()
        self._before = self._on_disk()

    def _on_disk(self) -> int:
        try:
            return sum(path.stat().st_size for path in self.blobs.iterdir())
        except OSError:  # not there yet, or a file renamed while read
            return 0

    def done(self) -> int:
        return min(self.total, max(0, self._on_disk() - self._before))

    def line(self, done: int) -> str:
        share = f" ({done / self.total:.0%})" if self.total else ""
        return f"downloading {self.repo} from the Hugging Face hub: {mib(done)} of {mib(self.total)}{share}"

    async def watch(self, finished: asyncio.Future[str], report: Report, stall_s: float) -> None:
        """Report the bytes until ``finished``; DownloadStalledError when none arrives for ``stall_s``."""
        last, moved, logged = -1, time.monotonic(), time.monotonic()
        while not finished.done():
            await asyncio.wait([finished], timeout=POLL_S)
            done = await asyncio.to_thread(self.done)
            now = time.monotonic()
            if done != last:
                last, moved = done, now
                report(self.line(done), SHARE * done / self.total if self.total else 0.0)
            elif stall_s > 0 and now - moved > stall_s and not finished.done():
                raise DownloadStalledError(
                    f"downloading {self.repo} from the Hugging Face hub stalled: no byte for {stall_s:g} s "
                    f"(--download-stall-timeout) after {mib(done)} of {mib(self.total)}; the next request tries "
                    "again and resumes it"
                )
            if now - logged >= LOG_EVERY_S:
                logged = now
                log.info("%s", self.line(done))
