"""Server-side model management: list, preload, unload; and the listing of several servers, each with its own
models (as ``clemserve models --address A --address B`` and ``clemserve clemcore-setup`` ask for it)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

from .calls import call
from .channel import address_for, channel_for, default_address
from .convert import Selector, selector_name, selector_to_proto, spec_from_proto
from .retry import ServerWait
from .spend import Spend

_STATES = {
    pb.MODEL_STATE_NOT_LOADED: "not_loaded",
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_FAILED: "failed",
}
_AVAILABILITY = {
    pb.MODEL_AVAILABILITY_READY: "ready",
    pb.MODEL_AVAILABILITY_CAN_LOAD: "can_load",
    pb.MODEL_AVAILABILITY_NEEDS_KEY: "needs_key",
    pb.MODEL_AVAILABILITY_NEEDS_WEIGHTS: "needs_weights",
    pb.MODEL_AVAILABILITY_NEEDS_EXTRA: "needs_extra",
    pb.MODEL_AVAILABILITY_NEEDS_GPU: "needs_gpu",
    pb.MODEL_AVAILABILITY_NOT_SERVED: "not_served",
}
#: the availabilities of models that can run on the server now
RUNNABLE = frozenset({"ready", "can_load"})


@dataclass(frozen=True)
class ModelStatus:
    model_spec: ModelSpec
    #: not_loaded, loading, ready or failed
    state: str
    state_reason: str
    load_seconds: float
    requests_in_flight: int
    requests_queued: int = 0
    #: active leases holding it loaded
    leases: int = 0
    estimated_memory_bytes: int = 0
    measured_memory_bytes: int = 0
    load_progress: float = 0.0
    idle_seconds: float = 0.0
    #: ready, can_load, needs_key, needs_weights, needs_extra, needs_gpu, not_served; unknown from a server
    #: that does not say
    availability: str = "unknown"
    #: what is missing (the key entry, the pip extra, the weights), or what the first load does first
    availability_detail: str = ""
    #: the estimate's parts and what it was read from
    estimated_weights_bytes: int = 0
    estimated_kv_cache_bytes: int = 0
    estimate_source: str = ""
    #: how measured_memory_bytes was found: "parameters and buffers" (CPU), "cuda allocated" (GPU), "estimate"
    #: (a model in a process of its own), "" (not loaded, or nothing to measure)
    measured_by: str = ""
    #: the process's resident-set growth across the load: for the operator, never charged to the model
    rss_delta_bytes: int = 0
    #: what it holds in the memory budget now
    charged_memory_bytes: int = 0
    #: (GPU index, bytes) of each GPU the load allocated on
    devices: tuple[tuple[int, int], ...] = ()
    #: its calls' usage and cost since the server started (all callers', ``clem run``'s included)
    spend: Spend = field(default_factory=Spend)
    #: while loaded: how it reuses prompt prefixes it computed before, and the bytes its prefix cache holds
    prefix_caching: str = ""
    prefix_cache_bytes: int = 0

    @property
    def name(self) -> str:
        return str(self.model_spec["model_name"])

    @property
    def runnable(self) -> bool:
        """Whether the server can run it now (loaded, or everything it needs is there)."""
        return self.availability in RUNNABLE


def _status(status: pb.ModelStatus) -> ModelStatus:
    return ModelStatus(
        model_spec=spec_from_proto(status.model_spec),
        state=_STATES.get(status.state, "unknown"),
        state_reason=status.state_reason,
        load_seconds=status.load_seconds,
        requests_in_flight=status.requests_in_flight,
        requests_queued=status.requests_queued,
        leases=status.leases,
        estimated_memory_bytes=status.estimated_memory_bytes,
        measured_memory_bytes=status.measured_memory_bytes,
        load_progress=status.load_progress,
        idle_seconds=status.idle_seconds,
        availability=_AVAILABILITY.get(status.availability, "unknown"),
        availability_detail=status.availability_detail,
        estimated_weights_bytes=status.estimated_weights_bytes,
        estimated_kv_cache_bytes=status.estimated_kv_cache_bytes,
        estimate_source=status.estimate_source,
        measured_by=status.measured_by,
        rss_delta_bytes=status.rss_delta_bytes,
        charged_memory_bytes=status.charged_memory_bytes,
        devices=tuple((d.index, d.bytes) for d in status.devices),
        spend=Spend.of_model(status.spend),
        prefix_caching=status.prefix_caching,
        prefix_cache_bytes=status.prefix_cache_bytes,
    )


def _stub(address: str, token: str | None) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel_for(address, token))


@dataclass(frozen=True)
class GpuBudget:
    """One GPU of the server's memory budget, as it stood when listed."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    budget_bytes: int
    used_by_others_bytes: int
    #: what the server process holds there in all, then split: tensors, allocator cache, CUDA context
    process_bytes: int
    allocated_bytes: int
    allocator_cache_bytes: int
    cuda_context_bytes: int


@dataclass(frozen=True)
class MemoryBudget:
    """The server's memory budget: its size, what loaded models hold of it, what it counts, its GPUs."""

    total_bytes: int
    used_bytes: int
    #: "gpu" or "ram" ("" before the server has looked)
    kind: str
    #: "nvml", "torch", "/proc/meminfo" or "--memory-budget"
    source: str
    #: the KV-cache tokens an estimate allows a model's batches (--kv-cache-tokens)
    kv_cache_tokens: int
    devices: tuple[GpuBudget, ...] = ()


def list_models(
    *, address: str | None = None, timeout: float | None = None, token: str | None = None
) -> list[ModelStatus]:
    """The server's registry entries with their load state."""
    return list_models_and_budget(address=address, timeout=timeout, token=token)[0]


def list_models_and_budget(
    *, address: str | None = None, timeout: float | None = None, token: str | None = None
) -> tuple[list[ModelStatus], MemoryBudget]:
    """The server's registry entries with their load state, and its memory budget."""
    address = address or default_address()
    reply = call(_stub(address, token).ListModels, pb.ListModelsRequest(), ServerWait(address, timeout))
    budget = MemoryBudget(
        total_bytes=reply.memory_budget_bytes,
        used_bytes=reply.memory_used_bytes,
        kind=reply.memory_kind,
        source=reply.memory_source,
        kv_cache_tokens=reply.kv_cache_tokens,
        devices=tuple(
            GpuBudget(
                index=d.index,
                name=d.name,
                uuid=d.uuid,
                total_bytes=d.total_bytes,
                budget_bytes=d.budget_bytes,
                used_by_others_bytes=d.used_by_others_bytes,
                process_bytes=d.process_bytes,
                allocated_bytes=d.allocated_bytes,
                allocator_cache_bytes=d.allocator_cache_bytes,
                cuda_context_bytes=d.cuda_context_bytes,
            )
            for d in reply.devices
        ),
    )
    return [_status(s) for s in reply.models], budget


@dataclass(frozen=True)
class ServerModels:
    """One server's part of a listing across servers: its models and budget, or why it did not answer."""

    address: str
    models: tuple[ModelStatus, ...] = ()
    budget: MemoryBudget | None = None
    error: ClemserveError | None = None


def list_servers(
    addresses: Sequence[str], *, timeout: float | None = None, token: str | None = None
) -> list[ServerModels]:
    """Each server's registry entries with their load state, the servers asked at once, in the order given
    (an address given twice is asked once). These are different servers, each with its own models; replicas of
    one server are one address (a multi-address target such as ``ipv4:A,B``)."""
    unique = list(dict.fromkeys(addresses))

    def listing(address: str) -> ServerModels:
        try:
            models, budget = list_models_and_budget(address=address, timeout=timeout, token=token)
        except ClemserveError as exc:
            return ServerModels(address, error=exc)
        return ServerModels(address, tuple(models), budget)

    if len(unique) == 1:
        return [listing(unique[0])]
    with ThreadPoolExecutor(max_workers=min(len(unique), 16)) as pool:
        return list(pool.map(listing, unique))


def shared_names(listings: Sequence[ServerModels]) -> dict[str, list[str]]:
    """The model names that more than one server can run (a server too old to say is taken at its word), each
    with those servers, in listing order: a game that names one of them plays it where its entry (or route)
    sends it, which the operator should know. A name only listed (every server lists the packaged registry)
    is not counted."""
    servers: dict[str, list[str]] = {}
    for listing in listings:
        runnable = (s.name for s in listing.models if s.runnable or s.availability == "unknown")
        for name in dict.fromkeys(runnable):
            servers.setdefault(name, []).append(listing.address)
    return {name: found for name, found in servers.items() if len(found) > 1}


def preload(
    selector: Selector, *, address: str | None = None, timeout: float | None = None, token: str | None = None
) -> ModelStatus:
    """Load a model on the server now, so the first generation does not wait for it (a server with an
    admin token wants that token here)."""
    address = address or address_for(selector_name(selector))
    request = pb.LoadModelRequest(model=selector_to_proto(selector))
    return _status(call(_stub(address, token).LoadModel, request, ServerWait(address, timeout)).status)


def unload(
    selector: Selector, *, address: str | None = None, timeout: float | None = None, token: str | None = None
) -> bool:
    """Free a model on the server; False if it was not loaded (a server with an admin token wants it here)."""
    address = address or address_for(selector_name(selector))
    request = pb.UnloadModelRequest(model=selector_to_proto(selector))
    return bool(call(_stub(address, token).UnloadModel, request, ServerWait(address, timeout)).was_loaded)
