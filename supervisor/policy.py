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
"""

from __future__ import annotations

import enum
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

    @property
    def busy(self) -> bool:
        return self.active > 0


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


def _fmt(n: int) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def _fits(s: Snapshot, others: Sequence[Resident], victims: Sequence[Resident]) -> bool:
    gone = {r.name for r in victims}
    stay = [r for r in others if r.name not in gone]
    freed = sum(r.footprint for r in victims)
    if s.need > s.limit - sum(r.footprint for r in stay):
        return False
    if s.need > s.available + freed - s.reserve:
        return False
    return not (s.max_loaded_models > 0 and len(stay) + 1 > s.max_loaded_models)


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


def decide(s: Snapshot) -> Decision:
    """What to do to load `s.name` (see module doc)."""
    if any(r.name == s.name for r in s.loaded):
        return Decision(Verdict.READY)
    others = list(s.loaded)
    evictable = [r for r in others if not r.pinned]
    pinned = [r for r in others if r.pinned]
    if not _fits(s, others, evictable):
        return Decision(Verdict.NEVER, message=_never_message(s, evictable, pinned))

    order = _victim_order(evictable)
    if s.single_model:
        victims = order
    else:
        victims = []
        for r in order:
            if _fits(s, others, victims):
                break
            victims.append(r)
    evict = tuple(r.name for r in victims if not r.busy)
    drain = tuple(r.name for r in victims if r.busy)
    return Decision(Verdict.WAIT if drain else Verdict.LOAD, evict=evict, drain=drain)
