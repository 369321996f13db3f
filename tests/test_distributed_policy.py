"""The fit policy across several hosts (supervisor/policy.py), on fake snapshots."""

from __future__ import annotations

import itertools
import random

import pytest
from corral.supervisor.policy import Decision, GiB, Host, Resident, Shape, Snapshot, Verdict, decide

HOSTS3 = (Host("127.0.0.1", 0), Host("10.0.0.2", 10 * GiB), Host("10.0.0.3", 10 * GiB))


def snap(need: int, shape: Shape | None, *, loaded: tuple[Resident, ...] = (), limit: int = 10 * GiB,
         hosts: tuple[Host, ...] = HOSTS3, shards: int = 0, available: int = 100 * GiB, **kw: object) -> Snapshot:
    return Snapshot(loaded=loaded, name="big", need=need, limit=limit, available=available, hosts=hosts,
                    shape=shape, shards=shards, **kw)  # type: ignore[arg-type]


def test_shape_per_host_divides_weights_and_kv_and_keeps_overhead() -> None:
    assert Shape(weights=10, kv=4, overhead=3).per_host(2) == 5 + 2 + 3
    assert Shape(weights=11, kv=5, overhead=0).per_host(2) == 6 + 3  # rounded up


def test_a_model_that_fits_one_host_runs_on_host_0_alone() -> None:
    d = decide(snap(8 * GiB, Shape(7 * GiB, GiB, 0)))
    assert d == Decision(Verdict.LOAD, hosts=(0,), per_host=0)


def test_a_model_too_big_for_one_host_takes_the_fewest_hosts_that_fit() -> None:
    shape = Shape(weights=14 * GiB, kv=2 * GiB, overhead=GiB)  # 2 hosts: 7 + 1 + 1 = 9 GiB each
    d = decide(snap(17 * GiB, shape))
    assert d.verdict is Verdict.LOAD and d.hosts == (0, 1) and d.per_host == 9 * GiB
    shape3 = Shape(weights=24 * GiB, kv=3 * GiB, overhead=GiB)  # 2: 14.5 GiB; 3: 10 GiB each
    d3 = decide(snap(28 * GiB, shape3))
    assert d3.hosts == (0, 1, 2) and d3.per_host == 10 * GiB


def test_the_other_hosts_are_those_with_the_most_room() -> None:
    busy_on_1 = Resident("other", 6 * GiB, hosts=(1,), pinned=True)
    d = decide(snap(17 * GiB, Shape(14 * GiB, 2 * GiB, GiB), loaded=(busy_on_1,)))
    assert d.hosts == (0, 2)


def test_a_per_host_limit_forces_two_ranks() -> None:
    hosts = (Host("127.0.0.1", 0), Host("127.0.0.1", 3 * GiB))
    d = decide(snap(5 * GiB, Shape(4 * GiB, 0, GiB), limit=3 * GiB, hosts=hosts))
    assert d.verdict is Verdict.LOAD and d.hosts == (0, 1) and d.per_host == 3 * GiB


def test_pinned_shards_are_used_even_when_one_host_would_do() -> None:
    d = decide(snap(2 * GiB, Shape(GiB, GiB, 0), shards=2))
    assert d.hosts == (0, 1) and d.per_host == GiB


def test_pinned_shards_beyond_the_hosts_is_never() -> None:
    d = decide(snap(2 * GiB, Shape(GiB, GiB, 0), shards=4))
    assert d.verdict is Verdict.NEVER and "pinned to 4 shards" in d.message and "3 host(s)" in d.message


def test_a_model_that_cannot_be_sharded_stays_on_one_host() -> None:
    d = decide(snap(12 * GiB, None))
    assert d.verdict is Verdict.NEVER


def test_fits_nowhere_names_the_per_host_need() -> None:
    d = decide(snap(40 * GiB, Shape(36 * GiB, 3 * GiB, GiB)))
    assert d.verdict is Verdict.NEVER
    assert "needs 14.00 GiB per host across 3 host(s)" in d.message
    assert "host 2 (10.0.0.3): limit 10.00 GiB" in d.message


def test_evicts_only_models_on_the_hosts_it_needs() -> None:
    on_1 = Resident("on1", 5 * GiB, hosts=(1,), last_used=1)
    on_2 = Resident("on2", 1 * GiB, hosts=(2,), last_used=0)
    on_0 = Resident("on0", 6 * GiB, hosts=(0,), last_used=2)
    d = decide(snap(17 * GiB, Shape(14 * GiB, 2 * GiB, GiB), loaded=(on_1, on_2, on_0)))
    # host 2 has the most room after host 1: it is picked; only host 0's model is in the way
    assert d.verdict is Verdict.LOAD and d.hosts == (0, 2) and d.evict == ("on0",)


def test_a_distributed_resident_is_evicted_from_every_host_at_once() -> None:
    spread = Resident("spread", 8 * GiB, hosts=(0, 1, 2), last_used=0)
    d = decide(snap(17 * GiB, Shape(14 * GiB, 2 * GiB, GiB), loaded=(spread,)))
    assert d.verdict is Verdict.LOAD and d.evict == ("spread",) and d.hosts == (0, 1)


def test_only_host_0_is_checked_against_available_memory() -> None:
    d = decide(snap(17 * GiB, Shape(14 * GiB, 2 * GiB, GiB), available=9 * GiB))
    assert d.hosts == (0, 1)
    d2 = decide(snap(17 * GiB, Shape(14 * GiB, 2 * GiB, GiB), available=8 * GiB))
    assert d2.verdict is Verdict.LOAD and d2.hosts == (0, 1, 2)  # 3 ranks need less on host 0


def test_without_hosts_the_decision_is_the_single_machine_one() -> None:
    d = decide(Snapshot(loaded=(), name="m", need=12 * GiB, limit=10 * GiB, available=100 * GiB,
                        shape=Shape(12 * GiB, 0, 0)))
    assert d.verdict is Verdict.NEVER and "memory limit 10.00 GiB" in d.message


# -- every decision checked against the definition, on random snapshots ------------------


def _fits_from_scratch(s: Snapshot, hosts: tuple[int, ...], need: int, gone: set[str]) -> bool:
    stay = [r for r in s.loaded if r.name not in gone]
    for h in hosts:
        limit = s.limit if h == 0 else s.hosts[h].limit
        if need > limit - sum(r.footprint for r in stay if h in r.hosts):
            return False
    freed = sum(r.footprint for r in s.loaded if r.name in gone and 0 in r.hosts)
    return need <= s.available + freed - s.reserve


def _need(s: Snapshot, k: int) -> int:
    assert s.shape is not None
    return s.need if k == 1 else s.shape.per_host(k)


def _any_fit(s: Snapshot, k: int, evictable: set[str]) -> bool:
    others = range(1, len(s.hosts))
    return any(_fits_from_scratch(s, (0, *rest), _need(s, k), evictable)
               for rest in itertools.combinations(others, k - 1))


def _random_snapshot(rng: random.Random) -> Snapshot:
    n_hosts = rng.randint(1, 4)
    hosts = tuple(Host(f"h{i}", rng.randint(2, 12) * GiB) for i in range(n_hosts))
    loaded = []
    for i in range(rng.randint(0, 4)):
        where = tuple(sorted(rng.sample(range(n_hosts), rng.randint(1, n_hosts))))
        loaded.append(Resident(f"m{i}", rng.randint(1, 5) * GiB, active=rng.choice([0, 0, 1]),
                               last_used=rng.random(), pinned=rng.random() < 0.2, hosts=where))
    shape = Shape(rng.randint(1, 30) * GiB, rng.randint(0, 4) * GiB, rng.randint(0, 1) * GiB)
    return Snapshot(loaded=tuple(loaded), name="big", need=shape.per_host(1), limit=hosts[0].limit,
                    available=rng.randint(4, 40) * GiB, hosts=hosts, shape=shape,
                    shards=rng.choice([0, 0, 0, 1, 2, 3]))


@pytest.mark.parametrize("seed", range(400))
def test_decisions_match_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    s = _random_snapshot(rng)
    d = decide(s)
    evictable = {r.name for r in s.loaded if not r.pinned}
    counts = [s.shards] if s.shards > 0 else list(range(1, len(s.hosts) + 1))
    possible = [k for k in counts if k <= len(s.hosts) and _any_fit(s, k, evictable)]
    if d.verdict is Verdict.NEVER:
        # the policy picks the roomiest hosts; no other choice of hosts would fit either
        assert not possible, (d, s)
        return
    k = len(d.hosts)
    assert d.hosts[0] == 0 and len(set(d.hosts)) == k and k in counts
    assert d.per_host == (0 if k == 1 else _need(s, k))
    assert _fits_from_scratch(s, d.hosts, _need(s, k), evictable), "fits with every evictable model gone"
    assert k == min(possible), "the fewest hosts that can fit it"
    victims = set(d.evict) | set(d.drain)
    assert not victims & {r.name for r in s.loaded if r.pinned}
    assert _fits_from_scratch(s, d.hosts, _need(s, k), victims), "the victims make room"
