"""``clemserve run --max-cost``: caps on what a run may spend, in total and per model.

``--max-cost USD`` caps the run's total, ``--max-cost MODEL=USD`` one model's (repeatable, each once). The
spend counted is what ``clemserve.json`` records for the run: its episodes' calls, those of the run's earlier
parts included (a resumed run starts with what it spent before). Episodes report what they spent when they
end, so once a cap is reached no new episode starts, the episodes in flight finish (and may take the spend
past the cap by what they cost), and the run exits with :data:`EXIT_BUDGET`, printing the command that
resumes it with higher caps.

A model the server cannot price would count as $0 and never reach a cap: a cap over such a model refuses to
start the run unless ``--allow-unpriced`` accepts that its calls count as $0. A call that turns out to have no
price while the run plays stops the run in the same way as a reached cap.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .spend import Spend, total

#: a cap was reached: the episodes in flight finished, the rest were not started
EXIT_BUDGET = 5
FLAG = "--max-cost"


@dataclass(frozen=True)
class Budget:
    """The run's caps in US dollars: ``total`` (None: none) and per model name."""

    total: float | None = None
    per_model: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.total is not None or bool(self.per_model)

    def capped(self, model: str) -> bool:
        """Whether ``model``'s spend counts against a cap."""
        return self.total is not None or model in self.per_model

    def reached(self, by_model: Mapping[str, Spend], allow_unpriced: bool = False) -> list[str]:
        """Why the run must start no more episodes (empty: it may go on): each cap its spend has reached, and,
        unless ``allow_unpriced``, each capped model whose calls had no price."""
        reasons = []
        if self.total is not None:
            spent = total(by_model.values()).cost_usd
            if spent >= self.total:
                reasons.append(f"the run spent ${spent:.4f}, reaching {FLAG} {_usd(self.total)}")
        for model, cap in self.per_model.items():
            spent = by_model.get(model, Spend()).cost_usd
            if spent >= cap:
                reasons.append(f"{model} spent ${spent:.4f}, reaching {FLAG} {model}={_usd(cap)}")
        if not allow_unpriced:
            for model, spend in by_model.items():
                if spend.unpriced_calls and self.capped(model):
                    reasons.append(f"{model} had {spend.unpriced_calls} calls without a price ({spend.unpriced})")
        return reasons

    def raised(self, by_model: Mapping[str, Spend]) -> Budget:
        """Caps for a resumed run: each reached cap raised to what was spent plus the cap again (in cents,
        rounded up), the others as they are."""
        spent = total(by_model.values()).cost_usd
        new_total = self.total
        if self.total is not None and spent >= self.total:
            new_total = _cents(spent + self.total)
        per_model = {
            model: _cents(by_model[model].cost_usd + cap)
            if model in by_model and by_model[model].cost_usd >= cap
            else cap
            for model, cap in self.per_model.items()
        }
        return Budget(new_total, per_model)

    def flags(self) -> list[str]:
        values = ([] if self.total is None else [_usd(self.total)]) + [
            f"{model}={_usd(cap)}" for model, cap in self.per_model.items()
        ]
        return [part for value in values for part in (FLAG, value)]


def parse_max_cost(values: Sequence[str] | None, models: Iterable[str]) -> Budget:
    """The ``--max-cost`` values: ``USD`` (the run's total) or ``MODEL=USD`` (one of the run's ``models``),
    each once; ValueError naming the value that is wrong."""
    known = list(models)
    total_cap: float | None = None
    per_model: dict[str, float] = {}
    for value in values or ():
        model, sep, amount = value.rpartition("=")
        usd = _amount(amount, value)
        if not sep:
            if total_cap is not None:
                raise ValueError(f"{FLAG}: the run's total is given twice ({_usd(total_cap)} and {value})")
            total_cap = usd
            continue
        model = model.strip()
        if model not in known:
            raise ValueError(f"{FLAG} {value}: {model!r} is not one of the run's models ({', '.join(known)})")
        if model in per_model:
            raise ValueError(f"{FLAG}: {model} is given twice")
        per_model[model] = usd
    return Budget(total_cap, per_model)


def _amount(text: str, value: str) -> float:
    try:
        usd = float(text.strip().removeprefix("$"))
    except ValueError:
        usd = -1.0
    if not 0 < usd < math.inf:
        raise ValueError(f"{FLAG} {value}: the cap must be a number of US dollars above 0 (USD or MODEL=USD)")
    return usd


def refused_unpriced(budget: Budget, unpriced: Mapping[str, str]) -> list[str]:
    """The capped models that the server cannot price (``unpriced``: model name -> the server's reason),
    each with its reason."""
    return [f"{model}: {why}" for model, why in unpriced.items() if why and budget.capped(model)]


def resume_command(argv: Sequence[str], budget: Budget) -> str:
    """The command line ``argv`` (without the program) with its ``--max-cost`` values replaced by
    ``budget``'s, as a shell command."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(FLAG + "="):
            kept.append(arg)
    return shlex.join(["clemserve", *kept, *budget.flags()])


def _usd(value: float) -> str:
    return f"{value:g}"


def _cents(value: float) -> float:
    return math.ceil(value * 100 - 1e-9) / 100


def checked_budget(values: Sequence[str] | None, models: Sequence[object], allow_unpriced: bool) -> Budget:
    """The run's caps, once the server says it can price every capped model (or ``allow_unpriced``);
    ValueError naming the value or the models that are wrong. ``models``: clemcore's loaded models."""
    budget = parse_max_cost(values, [str(getattr(model, "name", "")) for model in models])
    if not budget or allow_unpriced:
        return budget
    refused = refused_unpriced(budget, unpriced_models(models))
    if refused:
        raise ValueError(
            f"{FLAG}: the server cannot price "
            + "; ".join(refused)
            + ": their calls would count as $0 and never reach a cap (--allow-unpriced accepts that)"
        )
    return budget


def unpriced_models(models: Sequence[object]) -> dict[str, str]:
    """Why the server cannot price each clemserve model's calls, by model name ("": it can)."""
    import grpc

    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    from .calls import model_metadata
    from .channel import channel_for
    from .convert import selector_to_proto
    from .errors import error_from_rpc

    found = {}
    for model in models:
        remote = getattr(model, "remote", None)
        if remote is None:  # not a clemserve model: it costs nothing here
            continue
        stub = pb_grpc.ModelServiceStub(channel_for(remote.address, None))
        request = pb.ResolveModelRequest(model=selector_to_proto(remote.model_spec), describe=True)
        try:
            reply = stub.ResolveModel(request, timeout=30, metadata=model_metadata(request))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, remote.address) from None
        found[remote.name] = reply.unpriced
    return found


def stopped_lines(
    budget: Budget, by_model: Mapping[str, Spend], argv: Sequence[str], not_started: int, allow_unpriced: bool
) -> list[str]:
    """What the run says when a cap stopped it: why (the spend at the end, the episodes in flight included), and
    the command that resumes it with higher caps."""
    reasons = budget.reached(by_model, allow_unpriced)
    unpriced = any(spend.unpriced_calls and budget.capped(model) for model, spend in by_model.items())
    command = resume_command(argv, budget.raised(by_model)) + (" --allow-unpriced" if unpriced else "")
    return [
        f"budget reached: {'; '.join(reasons)}. The episodes in flight finished; {not_started} were not started.",
        "resume with higher caps (what this run spent counts toward them):",
        "  " + command,
    ]
