"""Spend limits held by the server: ``--spend-limit NAME=AMOUNT/PERIOD`` for a provider (a remote backend's
name) or a key.json entry, in US dollars per calendar hour, day or month in UTC.

Before a call on a model under a limit is forwarded, its worst case is reserved: its prompt's tokens at most
(the UTF-8 bytes of its text: a byte-level tokenizer never makes more tokens than bytes; plus an allowance per
message and per image) and its ``max_tokens``, at the model's prices with no cached tokens (each prompt token at
the input price or, where the provider bills a write to its prompt cache above that, as Anthropic does, at the
write's price). A call whose worst case would take the period's spent and reserved amounts past the limit is
refused (RESOURCE_EXHAUSTED, reason ``QUOTA_EXCEEDED``, with the numbers), so calls in flight together never take
the total over it. When the call ends, its reservation is settled at what it really cost (the cost the call was
charged at, once, for the model's totals and the reply), or released at 0 when it failed. A model under a limit
that the server cannot price is refused (FAILED_PRECONDITION): a limit that cannot be checked is not bypassed.

What was spent is kept in ``<cache dir>/spend.sqlite3`` (SQLite in WAL mode; one row per name, period and
period start), read at every reservation, so that a restart keeps it and servers sharing the cache directory
count each other's settled calls (reservations are each process's own). A file that is not such a record
stops the start, named with the field that is wrong: never a silent zero.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError, FailedPreconditionError, ResourceExhaustedError

from .backends import key_entry
from .domain import Cost, GenArgs, Generation, Message
from .pricing import Pricing

PERIODS = ("hour", "day", "month")
#: the spend file's name in the cache directory
SPEND_FILE = "spend.sqlite3"
#: tokens a message may add beyond its text (role markers, separators), counted generously
MESSAGE_TOKENS = 16
#: tokens an image is reserved at (providers bill a few hundred to a few thousand per image)
IMAGE_TOKENS = 4096

_COLUMNS = ("name", "period", "period_start", "usd")


@dataclass(frozen=True)
class SpendLimit:
    """At most ``usd`` US dollars per calendar ``period`` (UTC) for the calls of provider or key ``name``."""

    name: str
    usd: float
    period: str

    def __str__(self) -> str:
        return f"{self.name}={self.usd:g}/{self.period}"

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """The calendar period (UTC) that ``now`` falls in: its start and its end."""
        now = now.astimezone(UTC)
        if self.period == "hour":
            start = now.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        if self.period == "day":
            start = now.replace(hour=0, minute=0, second=0, microsecond=0)
            return start, start + timedelta(days=1)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end


def parse_spend_limit(text: str) -> SpendLimit:
    """``NAME=AMOUNT/PERIOD`` (``openai=50/day``; AMOUNT in US dollars, a leading $ allowed); ValueError
    naming the part that is wrong."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME=AMOUNT/PERIOD (for example openai=50/day)")
    amount, slash, period = rest.partition("/")
    period = period.strip().lower()
    if not slash or period not in PERIODS:
        raise ValueError(f"{name}: the period must be one of {', '.join(PERIODS)} after a '/', got {rest.strip()!r}")
    try:
        usd = float(amount.strip().removeprefix("$"))
    except ValueError:
        usd = -1.0
    if not 0 < usd < math.inf:
        raise ValueError(f"{name}: the amount must be a number of US dollars above 0, got {amount.strip()!r}")
    return SpendLimit(name, usd, period)


class QuotaExceededError(ResourceExhaustedError):
    """A call whose worst case would take a spend limit's period past it."""

    reason = "QUOTA_EXCEEDED"


@dataclass
class Reservation:
    """A call's worst case, held against each limit it is under until it is settled."""

    keys: tuple[tuple[str, str, str], ...]
    usd: float
    settled: bool = False


class SpendLedger:
    """The limits, what was spent in each one's current period (the spend file) and what calls in flight hold.

    Reserving and settling take one lock: the check of a reservation and its taking are one step, whatever
    thread or task asks."""

    def __init__(self, limits: Sequence[SpendLimit], path: Path, clock: Callable[[], datetime] | None = None) -> None:
        self.limits: dict[str, list[SpendLimit]] = {}
        for limit in limits:
            self.limits.setdefault(limit.name, []).append(limit)
        self.path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._reserved: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()
        self._db = _open(path)

    def close(self) -> None:
        self._db.close()

    def spent(self, limit: SpendLimit, now: datetime | None = None) -> float:
        """What the spend file records for ``limit``'s period now."""
        start, _ = limit.window(now or self._clock())
        with self._lock:
            return self._spent((limit.name, limit.period, start.isoformat()))

    def _spent(self, key: tuple[str, str, str]) -> float:
        row = self._db.execute(
            "SELECT usd FROM spend WHERE name = ? AND period = ? AND period_start = ?", key
        ).fetchone()
        return float(row[0]) if row else 0.0

    def reserve(self, names: Iterable[str], worst_usd: float, what: str = "this call") -> Reservation:
        """Hold ``worst_usd`` against every limit of ``names``; QuotaExceededError with the numbers when it
        would take one of them past its amount (then nothing is held)."""
        now = self._clock()
        keys = []
        with self._lock:
            for name in names:
                for limit in self.limits.get(name, ()):
                    start, end = limit.window(now)
                    key = (limit.name, limit.period, start.isoformat())
                    spent, reserved = self._spent(key), self._reserved.get(key, 0.0)
                    if spent + reserved + worst_usd > limit.usd:
                        raise _exceeded(limit, spent, reserved, worst_usd, end, what)
                    keys.append(key)
            for key in keys:
                self._reserved[key] = self._reserved.get(key, 0.0) + worst_usd
        return Reservation(tuple(keys), worst_usd)

    def settle(self, reservation: Reservation, usd: float) -> None:
        """Release the reservation and record ``usd`` (what the call really cost; 0 when it failed) as spent
        in the periods it was reserved in. Settling twice does nothing."""
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            for key in reservation.keys:
                self._reserved[key] = max(0.0, self._reserved.get(key, 0.0) - reservation.usd)
                if self._reserved[key] == 0.0:
                    del self._reserved[key]
            if usd > 0 and reservation.keys:
                with self._db:
                    self._db.executemany(
                        "INSERT INTO spend (name, period, period_start, usd) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (name, period, period_start) DO UPDATE SET usd = usd + excluded.usd",
                        [(*key, usd) for key in reservation.keys],
                    )


def _exceeded(
    limit: SpendLimit, spent: float, reserved: float, worst: float, end: datetime, what: str
) -> QuotaExceededError:
    return QuotaExceededError(
        f"--spend-limit {limit}: {what} may cost up to ${worst:.6f}, which would take the {limit.period}'s spend "
        f"past ${limit.usd:g}: ${spent:.6f} spent, ${reserved:.6f} reserved by calls in flight; the "
        f"{limit.period} ends {end.isoformat()}",
        metadata={
            "limit": limit.name,
            "limit_usd": f"{limit.usd:g}",
            "period": limit.period,
            "spent_usd": f"{spent:.6f}",
            "reserved_usd": f"{reserved:.6f}",
            "call_worst_case_usd": f"{worst:.6f}",
            "period_end": end.isoformat(),
        },
    )


def _open(path: Path) -> sqlite3.Connection:
    """The spend file, created when missing; ValueError naming the file and the field for one that is not a
    spend file or holds a row that is not a spend."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS spend (name TEXT NOT NULL, period TEXT NOT NULL, period_start TEXT NOT NULL, "
            "usd REAL NOT NULL, PRIMARY KEY (name, period, period_start))"
        )
        columns = [row[1] for row in db.execute("PRAGMA table_info(spend)")]
        rows = db.execute("SELECT rowid, * FROM spend").fetchall() if set(_COLUMNS) <= set(columns) else []
    except sqlite3.Error as exc:
        raise ValueError(
            f"spend file {path}: not a clemserve spend file ({exc}); move it away to count from 0 again"
        ) from None
    except OSError as exc:  # the cache directory cannot be made, or the file cannot be opened
        raise ValueError(f"spend file {path}: cannot open it: {exc.strerror or exc}") from None
    missing = [column for column in _COLUMNS if column not in columns]
    if missing:
        db.close()
        raise ValueError(f"spend file {path}: table spend has no column {missing[0]!r}: not a clemserve spend file")
    index = {column: columns.index(column) + 1 for column in _COLUMNS}
    for row in rows:
        problem = _bad_field(*(row[index[column]] for column in _COLUMNS))
        if problem:
            db.close()
            raise ValueError(f"spend file {path}: row {row[0]}: {problem}")
    return db


def _bad_field(name: object, period: object, start: object, usd: object) -> str:
    """What is wrong with a row of the spend file ("" when nothing)."""
    if not isinstance(name, str) or not name:
        return f"name must be a limit's name, got {name!r}"
    if period not in PERIODS:
        return f"period must be one of {', '.join(PERIODS)}, got {period!r}"
    try:
        parsed = datetime.fromisoformat(str(start)) if isinstance(start, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() != timedelta(0):
        return f"period_start must be an ISO time in UTC, got {start!r}"
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not 0 <= usd < math.inf:
        return f"usd must be a number of US dollars >= 0, got {usd!r}"
    return ""


def prompt_token_bound(messages: Sequence[Message]) -> int:
    """At most how many tokens the provider can count for these messages: each text's UTF-8 bytes, plus
    an allowance per message and per image."""
    tokens = 0
    for message in messages:
        tokens += len(str(message.get("content", "")).encode()) + MESSAGE_TOKENS
        tokens += IMAGE_TOKENS * len(message.get("image") or ())
    return tokens


class SpendGuard:
    """The model cache's hook, and the one place a call is priced: every call that returns is charged once (its
    ``cost`` set, its model's totals added); a call on a model under a limit is also reserved before it is sent
    and settled at that same cost after. Without a ledger (no ``--spend-limit``) calls are only charged."""

    def __init__(self, ledger: SpendLedger | None, pricing: Pricing) -> None:
        self.ledger = ledger
        self.pricing = pricing

    def names(self, spec: ModelSpec) -> list[str]:
        """The limits' names that ``spec``'s calls count against: its key.json entry's and its backend's."""
        if self.ledger is None:
            return []
        try:
            key = key_entry(spec)
        except ClemserveError:
            key = ""
        return [name for name in dict.fromkeys((key, str(spec.get("backend", "")))) if name in self.ledger.limits]

    async def call(
        self,
        spec: ModelSpec,
        messages: Sequence[Message],
        args: GenArgs,
        attempt: Callable[[], Awaitable[Generation]],
    ) -> Generation:
        """``attempt()``'s generation, charged, and reserved and settled against the limits ``spec`` is under."""
        names = self.names(spec)
        if not names:
            generation = await attempt()
            self.pricing.charge(spec, generation)
            return generation
        assert self.ledger is not None
        bound = prompt_token_bound(messages)
        worst = self.worst_case(spec, bound, max(0, args.max_tokens))
        if worst.unpriced:
            limits = ", ".join(str(limit) for name in names for limit in self.ledger.limits[name])
            raise FailedPreconditionError(
                f"model {spec['model_name']} is under --spend-limit {limits} but has no price ({worst.unpriced}); "
                "a limit that cannot be checked is not bypassed",
                subject=f"model_config.price of {spec['model_name']}",
            )
        what = f"this call ({bound} prompt tokens at most, max_tokens {args.max_tokens})"
        held = self.ledger.reserve(names, worst.usd, what)
        try:
            generation = await attempt()
        except BaseException:
            self.ledger.settle(held, 0.0)
            raise
        self.ledger.settle(held, self.pricing.charge(spec, generation).usd)
        return generation

    def worst_case(self, spec: ModelSpec, prompt_tokens: int, completion_tokens: int) -> Cost:
        """The most a call of these tokens can cost: each prompt token at the input price or, where it costs
        more, at the price of a write to the provider's prompt cache (Anthropic bills writes above input)."""
        plain = Generation(None, {}, "", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        costs = (
            self.pricing.cost(spec, plain),
            self.pricing.cost(spec, replace(plain, cache_write_tokens=prompt_tokens)),
        )
        return max(costs, key=lambda cost: cost.usd)
