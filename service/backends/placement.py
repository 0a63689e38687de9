"""Where a transformers model's weights go, and what a failure on its device means.

``device_map="auto"`` alone spreads even a small model over every visible GPU and, when GPU memory is
short, quietly runs layers on the CPU (or from disk) while the model's first parameter still says
``cuda:0``. Here a model goes to the GPUs admission chose for it (the GPUs with room, service/devices.py;
as many as ``model_config.number_gpus``, clembench's field, says, else the fewest that hold it), through
``max_memory``: the other GPUs take nothing. Without a choice (no GPU budget) it takes GPUs 0 to
``number_gpus`` - 1, all visible GPUs without it. The map accelerate chose is logged, and CPU or disk
offload of a model meant for GPUs is refused unless the server allows it (``--allow-offload``).

A CUDA error (a device-side assert, an illegal memory access) leaves the CUDA context unusable for every
later kernel: the backend is then dead (:class:`~.base.BackendDeadError`), not merely one call failed. Out
of memory is the call's own failure: RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from clemserve.registry.errors import FailedPreconditionError, ResourceExhaustedError

from .base import BackendContext, BackendDeadError, lower_thread_priority
from .chat import precondition, weights_missing

T = TypeVar("T")

log = logging.getLogger(__name__)

#: what torch's messages say after a failure that poisons the CUDA context (torch raises RuntimeError, or
#: torch.AcceleratorError, a RuntimeError, since 2.8)
_CUDA_FAILURES = ("cuda error", "cublas_status_", "cudnn_status_", "cudnn error", "device-side assert")
_OFFLOADED = ("cpu", "disk")


@dataclass(frozen=True)
class Placement:
    """The GPUs a model may use (indices among the visible ones, empty: a CPU model) and the keyword
    arguments of ``from_pretrained`` that put it there."""

    gpus: tuple[int, ...]
    kwargs: dict[str, Any]

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)


def plan(
    model_name: str,
    config: Mapping[str, Any],
    free_gpu_bytes: Sequence[int],
    *,
    allow_offload: bool,
    host_bytes: int = 0,
    chosen: Sequence[int] = (),
) -> Placement:
    """The placement of a model whose ``model_config`` is ``config`` on a machine whose visible GPUs have
    ``free_gpu_bytes`` free (none: a CPU machine). ``host_bytes``: RAM offered to an allowed CPU offload;
    ``chosen``: the GPUs admission placed it on (CUDA's indices; none: GPUs 0 to ``number_gpus`` - 1)."""
    requested = config.get("number_gpus")
    if not free_gpu_bytes:
        if requested:
            log.warning(
                "%s: model_config.number_gpus=%s, but no GPU is visible: it runs on the CPU", model_name, requested
            )
        return Placement((), {"device_map": "auto"})
    count = len(free_gpu_bytes)
    if requested is None:
        wanted = count
    elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1:
        wanted = requested
    else:
        raise FailedPreconditionError(
            f"{model_name}: model_config.number_gpus must be a positive integer, got {requested!r}",
            subject="model_config.number_gpus",
        )
    if wanted > count:
        raise FailedPreconditionError(
            f"{model_name} asks for {wanted} GPUs (model_config.number_gpus) but {count} "
            f"{'is' if count == 1 else 'are'} visible to the server; lower number_gpus or make more GPUs "
            "visible (CUDA_VISIBLE_DEVICES)",
            subject="model_config.number_gpus",
        )
    fits = chosen and all(0 <= gpu < count for gpu in chosen) and (requested is None or len(chosen) == wanted)
    gpus = tuple(chosen) if fits else tuple(range(wanted))
    # only the devices named here are used: the GPUs beyond number_gpus take nothing, and the CPU nothing
    # unless offload is allowed (what does not fit then goes to "disk", which the check below refuses)
    max_memory: dict[int | str, int] = {i: int(free_gpu_bytes[i]) for i in gpus}
    if allow_offload and host_bytes > 0:
        max_memory["cpu"] = int(host_bytes)
    return Placement(gpus, {"device_map": "auto", "max_memory": max_memory})


async def place(model_name: str, config: Mapping[str, Any], context: BackendContext) -> Placement:
    """:func:`plan` for this machine's visible GPUs (and, with offload allowed, its free RAM), found off the
    loop, on the GPUs admission granted (``context.grant``). torch starts CUDA first, under the server's own
    ``CUDA_VISIBLE_DEVICES`` (an engine being started may have its own in the environment meanwhile)."""
    await asyncio.to_thread(_start_cuda)
    gpus = await asyncio.to_thread(visible_gpus)
    host = await asyncio.to_thread(host_available_bytes) if context.allow_offload else 0
    return plan(
        model_name, config, gpus, allow_offload=context.allow_offload, host_bytes=host, chosen=context.grant.gpus
    )


def _start_cuda() -> None:
    from .. import gpus

    gpus.start_cuda()


def check_loading_options(config: Mapping[str, Any]) -> None:
    """Refuse, before anything loads, a loading option whose package is not installed: FAILED_PRECONDITION
    naming the package, not an error from deep inside transformers."""
    if (config.get("load_in_8bit") or config.get("load_in_4bit")) and not _installed("bitsandbytes"):
        raise precondition(
            "model_config.load_in_8bit/load_in_4bit need the bitsandbytes package (and a GPU)",
            "pip install bitsandbytes",
        )
    if config.get("peft_model") and not _installed("peft"):
        raise precondition("model_config.peft_model needs the peft package", "pip install peft")
    attention = str(config.get("attn_implementation") or "")
    if attention.startswith("flash_attention") and not _installed("flash_attn"):
        raise precondition(
            f"model_config.attn_implementation {attention} needs the flash-attn package (and a CUDA GPU); "
            "install it or choose sdpa",
            "pip install flash-attn",
        )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_placed(model_name: str, placement: Placement, allow: bool, load: Callable[[], Any]) -> Any:
    """``load()`` (a ``from_pretrained`` given ``placement.kwargs``) -> the model, its real device map logged;
    a GPU model that accelerate put partly on the CPU or disk is refused unless ``allow`` (:func:`check_offload`)."""
    try:
        model = load()
    except ValueError as exc:  # accelerate: what does not fit went to "disk", and no offload folder is set
        if not placement.on_gpu or "offload" not in str(exc).lower():
            raise
        raise offload_refused(model_name, placement, "layers on the disk") from None
    device_map = getattr(model, "hf_device_map", None)
    log.info("%s placed: %s", model_name, describe(device_map))
    try:
        check_offload(model_name, placement, device_map, allow)
    except ResourceExhaustedError:
        del model
        raise
    return model


def describe(device_map: Mapping[str, Any] | None) -> str:
    """A one-line summary of accelerate's ``hf_device_map``: each device with the modules it holds."""
    if not device_map:
        return "no device map"
    counts = Counter(_device_name(value) for value in device_map.values())
    return ", ".join(f"{device}: {n} module{'s' if n != 1 else ''}" for device, n in sorted(counts.items()))


def offloaded(device_map: Mapping[str, Any] | None) -> dict[str, int]:
    """The modules of ``device_map`` that run off the GPUs, counted per place (``cpu``, ``disk``)."""
    counts = Counter(_device_name(value) for value in (device_map or {}).values())
    return {device: n for device, n in counts.items() if device in _OFFLOADED}


def check_offload(model_name: str, placement: Placement, device_map: Mapping[str, Any] | None, allow: bool) -> None:
    """Refuse a GPU model that accelerate partly placed on the CPU or disk (unless ``allow``, then warn)."""
    if not placement.on_gpu:
        return
    away = offloaded(device_map)
    if not away:
        return
    where = " and ".join(f"{n} module{'s' if n != 1 else ''} on the {device}" for device, n in sorted(away.items()))
    if allow:
        log.warning(
            "%s does not fit on its %d GPU(s): %s (allowed by --allow-offload; slow)",
            model_name,
            len(placement.gpus),
            where,
        )
        return
    raise offload_refused(model_name, placement, where)


def offload_refused(model_name: str, placement: Placement, where: str) -> ResourceExhaustedError:
    gpus = len(placement.gpus)
    free = sum(int(v) for k, v in placement.kwargs.get("max_memory", {}).items() if isinstance(k, int))
    return ResourceExhaustedError(
        f"{model_name} does not fit on its {gpus} GPU{'s' if gpus != 1 else ''} ({free / 2**30:.1f} GiB free): "
        f"{where} would run it many times slower. Free GPU memory (unload other models), set "
        "model_config.number_gpus to use more GPUs, load it quantized (model_config.load_in_8bit or "
        "load_in_4bit), or start the server with --allow-offload to accept the offload",
        available_bytes=free,
        metadata={"field": "model_config.number_gpus", "offload": where},
    )


def is_cuda_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error that leaves the process's CUDA context unusable."""
    if type(exc).__name__ == "AcceleratorError":
        return True
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _CUDA_FAILURES)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (a RuntimeError), a host MemoryError, or a RuntimeError saying so."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def device_failure(model_name: str, doing: str, exc: BaseException) -> BaseException | None:
    """What a failure of ``doing`` (``generating``, ``loading``) on the model's device becomes: a dead backend
    for a CUDA error, RESOURCE_EXHAUSTED for out of memory, else None (the failure stays what it is). The
    caller frees torch's cached blocks once the failed call's frames (holding its tensors) are gone."""
    if is_out_of_memory(exc):
        return ResourceExhaustedError(f"out of memory while {doing} with {model_name}")
    if is_cuda_failure(exc):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BackendDeadError(
            f"a CUDA error while {doing} with {model_name} ({first_line}) left its GPU state unusable; the model "
            "is unloaded and the next request loads it again (if that fails too, restart the server)"
        )
    return None


def on_device(model_name: str, doing: str, call: Callable[[], T], free: Callable[[], None]) -> T:
    """``call()``, a failure of the device made what it means (:func:`device_failure`): a CUDA error kills the
    backend (the server unloads it; the next request loads it again), out of memory fails the call with
    RESOURCE_EXHAUSTED once ``free`` has handed torch's cached blocks back. Other errors pass unchanged."""
    try:
        return call()
    except (MemoryError, RuntimeError) as exc:
        failure = device_failure(model_name, doing, exc)
        if failure is None:
            raise
    if isinstance(failure, ResourceExhaustedError):  # after a CUDA error, CUDA calls fail too: left alone
        free()  # out of the except block: the failed call's frames no longer hold its tensors
    raise failure


def _device_name(value: Any) -> str:
    """accelerate writes GPUs as ints (or "cuda:N"/torch.device), and "cpu", "disk", "meta" as they are."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    text = str(value)
    return text if not text.isdigit() else f"cuda:{text}"


def visible_gpus() -> list[int]:
    """The free bytes of each GPU visible to this process (``CUDA_VISIBLE_DEVICES`` respected); none on a
    machine without CUDA. Asked of NVML where it is installed: torch's answer creates a CUDA context on every
    GPU. Else imports torch (called by a backend that loads it anyway, off the event loop)."""
    from .. import gpus

    pynvml = gpus.nvml()
    if pynvml is not None:
        try:
            found = gpus.read_nvml(pynvml)
        finally:
            pynvml.nvmlShutdown()
        return [max(0, gpu.total_bytes - gpu.used_by_others_bytes - gpu.process_bytes) for gpu in found]
    import torch

    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def host_available_bytes() -> int:
    """RAM available for an allowed CPU offload (0 where it cannot be told)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 0


class DeviceWorker:
    """The thread a torch model runs in, and where the model is placed (mixed into the transformers backends).

    The worker (and torch's threads, started from it) of a model on the CPU yields the CPU to the request path,
    so that refusals and new requests are not held up behind generation; a model on a GPU keeps the server's
    priority: its thread only launches kernels, and a lowered one would starve them whenever other processes
    fill the CPU. The thread starts at the first task, once placement is known.
    """

    model_name: str
    context: BackendContext

    def _start_worker(self) -> None:
        self._nice = self.context.compute_nice
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"hf-{self.model_name}", initializer=self._lower_priority
        )
        self.placement = Placement((), {"device_map": "auto"})

    def _lower_priority(self) -> None:
        lower_thread_priority(self._nice)

    async def _load_placed(self, config: Mapping[str, Any], load: Callable[[], None]) -> None:
        """Place the model by its entry (``number_gpus``) and run ``load`` in the worker, a CUDA failure or
        out-of-memory reported as :func:`on_device` does."""
        try:
            # the load's first CUDA calls: after a CUDA error in this process (a reload), they fail the same way
            self.placement = await place(self.model_name, config, self.context)
        except (MemoryError, RuntimeError) as exc:
            failure = device_failure(self.model_name, "finding room on its GPUs", exc)
            if failure is None:
                raise
            raise failure from None
        if self.placement.on_gpu:
            self._nice = 0
        await asyncio.get_running_loop().run_in_executor(
            self._executor, on_device, self.model_name, "loading", load, _free_memory
        )

    def _load_weights(
        self, auto_class: Any, source: str | Path, config: Mapping[str, Any], hub: Mapping[str, Any]
    ) -> tuple[Any, str]:
        """The model's weights (``auto_class.from_pretrained``, ``hub``: its token and remote-code arguments) with
        the entry's loading options (8- or 4-bit, attention implementation, a PEFT adapter), placed by
        :func:`load_placed`; a folder or file that is not there is :func:`~.chat.weights_missing`. Returns the
        model, in eval mode, and where it runs: its device, or accelerate's map when it spans several."""
        model_kwargs: dict[str, Any] = {**self.placement.kwargs, "dtype": "auto", **hub}
        if config.get("load_in_8bit") or config.get("load_in_4bit"):
            from transformers import BitsAndBytesConfig

            model_kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_8bit=bool(config.get("load_in_8bit")), load_in_4bit=bool(config.get("load_in_4bit"))
            )
        if config.get("attn_implementation"):
            model_kwargs["attn_implementation"] = config["attn_implementation"]
        try:
            model = load_placed(
                self.model_name,
                self.placement,
                self.context.allow_offload,
                lambda: auto_class.from_pretrained(source, **model_kwargs),
            )
        except OSError as exc:
            raise weights_missing(self.model_name, source, exc) from None
        device_map = getattr(model, "hf_device_map", None)
        if config.get("peft_model"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config["peft_model"])
        model.eval()
        where = describe(device_map) if device_map and len(device_map) > 1 else str(next(model.parameters()).device)
        return model, where

    async def _stop_worker(self, drop: Callable[[], None]) -> None:
        """Run ``drop`` (which lets go of the model) in the worker, then end the worker."""
        await asyncio.get_running_loop().run_in_executor(self._executor, drop)
        self._executor.shutdown(wait=False)


def _free_memory() -> None:
    from ..memory import free_memory

    free_memory()
