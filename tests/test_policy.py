"""The fit/evict policy: table-driven cases plus invariants over random snapshots."""

from __future__ import annotations

import random

import pytest
from corral.supervisor.policy import Decision, Resident, Snapshot, Verdict, decide

G = 1024**3


def R(name: str, gb: float, *, active: int = 0, t: float = 0.0, pinned: bool = False, draining: bool = False) -> Resident:
    return Resident(name, int(gb * G), active=active, last_used=t, pinned=pinned, draining=draining)


def S(loaded: list[Resident], need: float, *, limit: float = 10, avail: float | None = None, reserve: float = 0,
      max_loaded: int = 0, single: bool = False, name: str = "new") -> Snapshot:
    if avail is None:  # the OS has whatever the loaded models do not use
        avail = limit - sum(r.footprint for r in loaded) / G
    return Snapshot(tuple(loaded), name, int(need * G), int(limit * G), int(avail * G), int(reserve * G),
                    max_loaded, single)


CASES: list[tuple[str, Snapshot, Decision]] = [
    ("empty table, fits", S([], 4), Decision(Verdict.LOAD)),
    ("already loaded", S([R("new", 2)], 2), Decision(Verdict.READY)),
    ("fits beside others", S([R("a", 3), R("b", 3)], 3), Decision(Verdict.LOAD)),
    ("exactly at the limit", S([R("a", 5)], 5), Decision(Verdict.LOAD)),
    ("evict the LRU idle one", S([R("a", 4, t=2), R("b", 4, t=1)], 4), Decision(Verdict.LOAD, evict=("b",))),
    ("evict two LRU", S([R("a", 3, t=3), R("b", 3, t=1), R("c", 3, t=2)], 7),
     Decision(Verdict.LOAD, evict=("b", "c"))),
    ("idle before busy even if busy is older", S([R("a", 4, t=1, active=1), R("b", 4, t=5)], 4),
     Decision(Verdict.LOAD, evict=("b",))),
    ("only busy can go: drain it", S([R("a", 8, active=2)], 4), Decision(Verdict.WAIT, drain=("a",))),
    ("idle plus busy needed", S([R("a", 4, t=1, active=1), R("b", 4, t=5)], 8),
     Decision(Verdict.WAIT, evict=("b",), drain=("a",))),
    ("pinned never evicted: other goes", S([R("p", 4, t=0, pinned=True), R("b", 4, t=9)], 4),
     Decision(Verdict.LOAD, evict=("b",))),
    ("pinned makes it impossible", S([R("p", 8, pinned=True)], 4), Decision(Verdict.NEVER)),
    ("bigger than the limit", S([R("a", 1)], 11), Decision(Verdict.NEVER)),
    ("OS has less than the limit says", S([], 6, avail=5), Decision(Verdict.NEVER)),
    ("reserve counts", S([], 5, avail=5, reserve=0.5), Decision(Verdict.NEVER)),
    ("eviction frees OS memory", S([R("a", 4)], 5, avail=2), Decision(Verdict.LOAD, evict=("a",))),
    ("max_loaded_models evicts LRU", S([R("a", 1, t=2), R("b", 1, t=1)], 1, max_loaded=2),
     Decision(Verdict.LOAD, evict=("b",))),
    ("max_loaded_models with pinned only", S([R("p", 1, pinned=True)], 1, max_loaded=1), Decision(Verdict.NEVER)),
    ("max_loaded_models=1 busy: drain", S([R("a", 1, active=1)], 1, max_loaded=1),
     Decision(Verdict.WAIT, drain=("a",))),
    ("single model evicts all unpinned", S([R("a", 1, t=1), R("b", 1, t=2, active=1), R("p", 1, pinned=True)], 1,
                                           single=True),
     Decision(Verdict.WAIT, evict=("a",), drain=("b",))),
    ("single model, idle others", S([R("a", 1, t=2), R("b", 1, t=1)], 1, single=True),
     Decision(Verdict.LOAD, evict=("b", "a"))),
    ("single model off: no eviction", S([R("a", 1), R("b", 1)], 1), Decision(Verdict.LOAD)),
    ("single model keeps pinned", S([R("p", 1, pinned=True)], 1, single=True), Decision(Verdict.LOAD)),
    ("draining busy preferred among busy", S([R("a", 4, t=1, active=1), R("b", 4, t=2, active=1, draining=True)], 4),
     Decision(Verdict.WAIT, drain=("b",))),
]


@pytest.mark.parametrize("snap,expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_cases(snap: Snapshot, expected: Decision) -> None:
    got = decide(snap)
    assert (got.verdict, got.evict, got.drain) == (expected.verdict, expected.evict, expected.drain)


def test_never_message_names_need_limit_and_freeable() -> None:
    d = decide(S([R("p", 3, pinned=True), R("a", 2)], 9, limit=10))
    assert d.verdict is Verdict.NEVER
    assert "9.00 GiB" in d.message and "10.00 GiB" in d.message  # need, limit
    assert "2.00 GiB" in d.message  # what evicting every unpinned model frees
    assert "pinned" in d.message


def _fits(s: Snapshot, victims: set[str]) -> bool:
    others = [r for r in s.loaded if r.name != s.name]
    stay = [r for r in others if r.name not in victims]
    freed = sum(r.footprint for r in others if r.name in victims)
    return (s.need <= s.limit - sum(r.footprint for r in stay)
            and s.need <= s.available + freed - s.reserve
            and (s.max_loaded_models == 0 or len(stay) + 1 <= s.max_loaded_models))


def _random_snapshot(rng: random.Random) -> Snapshot:
    loaded = [
        Resident(f"m{i}", rng.randint(1, 8) * G // 2, active=rng.choice([0, 0, 1, 3]), last_used=rng.random(),
                 pinned=rng.random() < 0.15, draining=rng.random() < 0.1)
        for i in range(rng.randint(0, 6))
    ]
    limit = rng.randint(2, 24) * G // 2
    used = sum(r.footprint for r in loaded)
    avail = max(0, limit - used + rng.randint(-4, 4) * G // 2)
    name = rng.choice([r.name for r in loaded]) if loaded and rng.random() < 0.1 else "new"
    return Snapshot(tuple(loaded), name, rng.randint(1, 10) * G // 2, limit, avail,
                    rng.choice([0, G // 4]), rng.choice([0, 0, 1, 2, 3]), rng.random() < 0.2)


def test_invariants_over_random_snapshots() -> None:
    rng = random.Random(1234)
    seen = {v: 0 for v in Verdict}
    for _ in range(5000):
        s = _random_snapshot(rng)
        d = decide(s)
        seen[d.verdict] += 1
        by_name = {r.name: r for r in s.loaded}
        victims = set(d.evict) | set(d.drain)
        if d.verdict is Verdict.READY:
            assert s.name in by_name and not victims
            continue
        unpinned = {r.name for r in s.loaded if not r.pinned}
        if d.verdict is Verdict.NEVER:
            assert not victims, "never evicts when the answer is NEVER"
            assert not _fits(s, unpinned), "NEVER only when even evicting everything cannot fit"
            continue
        assert _fits(s, unpinned)
        assert all(not by_name[v].pinned for v in victims), "never evicts pinned"
        assert all(not by_name[v].busy for v in d.evict), "immediate victims are idle"
        assert all(by_name[v].busy for v in d.drain), "busy victims are drained, not cut"
        assert (d.verdict is Verdict.WAIT) == bool(d.drain)
        assert _fits(s, victims), "after the evictions it fits"
        if s.single_model:
            assert victims == unpinned
            continue
        # minimal: idle LRU first, and dropping the last victim would not fit
        order = list(d.evict) + list(d.drain)
        if order:
            assert not _fits(s, set(order[:-1]))
        idle_lru = sorted((r for r in s.loaded if not r.pinned and not r.busy), key=lambda r: r.last_used)
        assert list(d.evict) == [r.name for r in idle_lru[: len(d.evict)]]
        if d.drain:
            assert len(d.evict) == len(idle_lru), "busy victims only once every idle one is taken"
    assert all(n > 50 for n in seen.values()), seen


def test_never_message_names_the_model_by_its_label() -> None:
    s = Snapshot(loaded=(), name="org/big", need=11 * 1024**3, limit=10 * 1024**3, available=10 * 1024**3,
                 label="Org/Big")
    d = decide(s)
    assert d.verdict is Verdict.NEVER and "model 'Org/Big' needs" in d.message
    assert "model 'org/big' needs" in decide(Snapshot(loaded=(), name="org/big", need=s.need, limit=s.limit,
                                                       available=s.available)).message
