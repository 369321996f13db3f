"""The fit/evict decision: a pure function of a snapshot (no I/O, no clock).

The memory model and scheduling rules (README "Memory model") in one place. A model may
load when

    need <= limit - footprint(models that stay)
    need <= available + footprint(models evicted) - reserve
    loaded models after the load <= max_loaded_models (0: no cap)

Victims are taken idle first, least recently used first; when idle victims
are not enough, busy ones are added (LRU) and the decision becomes "wait for
these to drain". Pinned models are never victims. When the model cannot fit
even with every non-pinned model gone, the answer is NEVER, decided before
anything is evicted. Keeping this pure lets it be tested exhaustively.

Several hosts (the hosts setting): a model may also run as one distributed
runner whose ranks sit on k hosts, one rank each, host 0 (this machine, rank 0)
always among them. Each of those hosts then holds

    per_host(k) = weights/k + kv/k + overhead     (k = 1: the plain need)

checked against that host's limit minus what the models that stay hold there
(the available-memory check applies to host 0, the one machine we can measure).
The smallest k that fits with every evictable model gone wins (a model that
fits on one host runs there), taking host 0 and the other hosts with the most
room; a pinned shard count allows only that k. No k: NEVER, naming the per-host
need.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Resident:
    """A model in the table, as the policy sees it."""

    name: str
    footprint: int  # bytes: max(estimate, runner-reported)
    active: int = 0  # requests in flight
    last_used: float = 0.0
    pinned: bool = False
    draining: bool = False  # already chosen as a victim for a waiting load
    hosts: tuple[int, ...] = (0,)  # where it runs; footprint is what it holds on each of them

    @property
    def busy(self) -> bool:
        return self.active > 0


@dataclass(frozen=True)
class Host:
    """A machine models may run on (the hosts setting); host 0 is this one."""

    name: str
    limit: int  # bytes; host 0's comes from Snapshot.limit


@dataclass(frozen=True)
class Shape:
    """How the requested model's need splits when it runs as k ranks: weights and KV
    cache divide by k, each rank pays the overhead."""

    weights: int
    kv: int
    overhead: int

    def per_host(self, k: int) -> int:
        return math.ceil(self.weights / k) + math.ceil(self.kv / k) + self.overhead


@dataclass(frozen=True)
class Snapshot:
    loaded: tuple[Resident, ...]
    name: str  # the requested model
    need: int  # its estimated need in bytes
    limit: int  # memory limit in bytes
    available: int  # what the OS reports available now
    reserve: int = 0
    max_loaded_models: int = 0  # 0: no cap
    single_model: bool = False
    label: str = ""  # how messages name the requested model (default: name)
    hosts: tuple[Host, ...] = ()  # every host, host 0 first; () or one: this machine only
    shape: Shape | None = None  # None: the model cannot be sharded (one host only)
    shards: int = 0  # pinned rank count (the model's --shards); 0: the fewest hosts that fit


class Verdict(enum.Enum):
    READY = "ready"  # already loaded: nothing to do
    LOAD = "load"  # evict `evict` (all idle), then load
    WAIT = "wait"  # wait for `drain` to go idle, then decide again (nothing evicted yet)
    NEVER = "never"  # cannot fit even with every evictable model gone (507)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    evict: tuple[str, ...] = ()  # idle victims, LRU first
    drain: tuple[str, ...] = ()  # busy victims to drain first
    message: str = ""
    hosts: tuple[int, ...] = (0,)  # where to run it: more than one host is a distributed runner
    per_host: int = 0  # what it needs on each of those hosts (0: the plain need, on host 0)


def _fmt(n: int) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


@dataclass(frozen=True)
class _Placement:
    hosts: tuple[int, ...]
    need: int  # on each host


def _limit(s: Snapshot, host: int) -> int:
    return s.limit if host == 0 else s.hosts[host].limit


def _fits(s: Snapshot, others: Sequence[Resident], victims: Sequence[Resident],
          place: _Placement | None = None) -> bool:
    place = place or _Placement((0,), s.need)
    gone = {r.name for r in victims}
    stay = [r for r in others if r.name not in gone]
    for h in place.hosts:
        if place.need > _limit(s, h) - sum(r.footprint for r in stay if h in r.hosts):
            return False
    freed = sum(r.footprint for r in victims if 0 in r.hosts)
    if place.need > s.available + freed - s.reserve:
        return False
    return not (s.max_loaded_models > 0 and len(stay) + 1 > s.max_loaded_models)


def _placements(s: Snapshot, others: Sequence[Resident], evictable: Sequence[Resident]) -> list[_Placement]:
    """Candidate placements that fit with every evictable model gone, fewest hosts first
    (only the pinned count when there is one)."""
    if len(s.hosts) <= 1 and s.shards <= 1:
        return [_Placement((0,), s.need)]
    counts = [s.shards] if s.shards > 0 else list(range(1, len(s.hosts) + 1))
    if s.shape is None:
        counts = [k for k in counts if k == 1]
    gone = {r.name for r in evictable}

    def room(h: int, keep: set[str] | None) -> int:
        return _limit(s, h) - sum(r.footprint for r in others if h in r.hosts and (keep is None or r.name in keep))

    kept = {r.name for r in others} - gone
    # the hosts with most room now (no eviction needed), else those with most room once the
    # evictable models are gone (the best any choice of hosts can do)
    now = sorted(range(1, len(s.hosts)), key=lambda h: (-room(h, None), h))
    best = sorted(range(1, len(s.hosts)), key=lambda h: (-room(h, kept), h))
    found = []
    for k in counts:
        if k == 1:
            found.append(_Placement((0,), s.need))
            continue
        if s.shape is None or k > len(s.hosts):
            continue
        need = s.shape.per_host(k)
        for order in (now, best):
            place = _Placement((0, *sorted(order[:k - 1])), need)
            if _fits(s, others, evictable, place):
                found.append(place)
                break
        else:
            found.append(_Placement((0, *sorted(best[:k - 1])), need))  # for the message
    return found


def _short_hosts(s: Snapshot, others: Sequence[Resident], victims: Sequence[Resident],
                 place: _Placement) -> set[int]:
    """The hosts of `place` where the model does not fit yet (host 0 also for available memory)."""
    gone = {r.name for r in victims}
    stay = [r for r in others if r.name not in gone]
    short = {h for h in place.hosts
             if place.need > _limit(s, h) - sum(r.footprint for r in stay if h in r.hosts)}
    if place.need > s.available + sum(r.footprint for r in victims if 0 in r.hosts) - s.reserve:
        short.add(0)
    return short


def _victims(s: Snapshot, others: Sequence[Resident], order: Sequence[Resident],
             place: _Placement) -> list[Resident]:
    """Victims in `order` until the model fits, each one from a host still short of room
    (any one when only max_loaded_models is in the way)."""
    victims: list[Resident] = []
    while not _fits(s, others, victims, place):
        short = _short_hosts(s, others, victims, place)
        nxt = next((r for r in order if r not in victims and (not short or short & set(r.hosts))), None)
        if nxt is None:
            break
        victims.append(nxt)
    return victims


def _victim_order(candidates: Sequence[Resident]) -> list[Resident]:
    """Idle before busy; among busy, ones already draining first; then LRU."""
    return sorted(candidates, key=lambda r: (r.busy, r.busy and not r.draining, r.last_used, r.name))


def _never_message(s: Snapshot, evictable: Sequence[Resident], pinned: Sequence[Resident]) -> str:
    freeable = sum(r.footprint for r in evictable)
    pinned_bytes = sum(r.footprint for r in pinned)
    parts = [
        f"model '{s.label or s.name}' needs {_fmt(s.need)} but cannot fit: memory limit {_fmt(s.limit)}",
        f"available {_fmt(s.available)} minus reserve {_fmt(s.reserve)}",
        f"evicting every unpinned model would free {_fmt(freeable)}",
    ]
    if pinned:
        parts.append(f"pinned models hold {_fmt(pinned_bytes)}")
    if s.max_loaded_models > 0 and len(pinned) + 1 > s.max_loaded_models:
        parts.append(f"{len(pinned)} pinned models already reach max_loaded_models={s.max_loaded_models}")
    return "; ".join(parts)


def _hosts_never_message(s: Snapshot, places: Sequence[_Placement], evictable: Sequence[Resident]) -> str:
    label = s.label or s.name
    if not places:
        return (f"model '{label}' is pinned to {s.shards} shards but "
                + (f"only {len(s.hosts)} host(s) are configured" if s.shape is not None
                   else "it cannot be sharded"))
    widest = places[-1]
    gone = {r.name for r in evictable}
    hosts = "; ".join(
        f"host {h} ({s.hosts[h].name if h < len(s.hosts) else 'local'}): limit {_fmt(_limit(s, h))}, "
        f"{_fmt(sum(r.footprint for r in s.loaded if h in r.hosts and r.name not in gone))} held by pinned models"
        for h in widest.hosts)
    return (f"model '{label}' needs {_fmt(widest.need)} per host across {len(widest.hosts)} host(s) "
            f"but fits on no placement: {hosts}; available here {_fmt(s.available)} minus reserve "
            f"{_fmt(s.reserve)}")


def decide(s: Snapshot) -> Decision:
    """What to do to load `s.name` (see module doc)."""
    if any(r.name == s.name for r in s.loaded):
        return Decision(Verdict.READY)
    others = list(s.loaded)
    evictable = [r for r in others if not r.pinned]
    pinned = [r for r in others if r.pinned]
    places = _placements(s, others, evictable)
    place = next((p for p in places if _fits(s, others, evictable, p)), None)
    if place is None:
        if len(s.hosts) <= 1 and s.shards <= 1:
            return Decision(Verdict.NEVER, message=_never_message(s, evictable, pinned))
        return Decision(Verdict.NEVER, message=_hosts_never_message(s, places, evictable))

    order = _victim_order(evictable)
    victims = order if s.single_model else _victims(s, others, order, place)
    evict = tuple(r.name for r in victims if not r.busy)
    drain = tuple(r.name for r in victims if r.busy)
    per_host = place.need if len(place.hosts) > 1 else 0
    return Decision(Verdict.WAIT if drain else Verdict.LOAD, evict=evict, drain=drain,
                    hosts=place.hosts, per_host=per_host)
