"""Fast checks of the distributed pieces: the step items the leader shares, the hosts
setting, the launcher's command line and `--shards`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from corral.runner.distributed import StepSync, leader_address
from corral.runner.engine import Sequence
from corral.runner.protocol import SamplingOptions
from corral.supervisor.api.manage import create_parameters
from corral.supervisor.config import HostSpec, parse_hosts
from corral.supervisor.errors import BadRequest
from corral.supervisor.process import DistributedRunner, free_port_run

GIB = 1 << 30


class FakeGroup:
    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return 2


def seq(options: SamplingOptions, prompt: list[int] | None = None) -> Sequence:
    return Sequence(prompt=prompt or [1, 2, 3], options=options, max_tokens=7,
                    loop=asyncio.new_event_loop(), top_logprobs=2)


def roundtrip(leader: StepSync, follower: StepSync, items: list[tuple[str, Sequence | None]]) -> list[Any]:
    wire = [w for w in (leader._encode(kind, s) for kind, s in items) if w is not None]
    return [follower._decode(w) for w in json.loads(json.dumps(wire))]


def test_a_new_sequence_reaches_the_follower_with_the_same_inputs() -> None:
    leader, follower = StepSync(FakeGroup(0), None), StepSync(FakeGroup(1), None)
    opts = SamplingOptions(temperature=0.7, top_k=5, stop=("x", "yz"), seed=None)
    s = seq(opts)
    ((kind, copy),) = roundtrip(leader, follower, [("add", s)])
    assert kind == "add" and copy is not None
    # the leader fixed a seed, so every rank draws the same tokens
    assert s.options.seed is not None and copy.options == s.options
    assert (copy.prompt, copy.max_tokens, copy.top_logprobs) == (s.prompt, 7, 2)
    assert copy.grammar is None
    copy.emit("text", "goes nowhere")  # a follower's output is dropped


def test_greedy_keeps_no_seed_and_cancels_follow_by_key() -> None:
    leader, follower = StepSync(FakeGroup(0), None), StepSync(FakeGroup(1), None)
    a, b = seq(SamplingOptions(temperature=0)), seq(SamplingOptions(temperature=0), [9])
    out = roundtrip(leader, follower, [("add", a), ("add", b), ("wake", None)])
    assert [k for k, _ in out] == ["add", "add"] and a.options.seed is None
    cancel = roundtrip(leader, follower, [("cancel", b), ("cancel_all", None)])
    assert cancel[0] == ("cancel", out[1][1]) and cancel[1] == ("cancel_all", None)


def test_finished_sequences_are_forgotten_on_both_sides() -> None:
    leader, follower = StepSync(FakeGroup(0), None), StepSync(FakeGroup(1), None)
    a = seq(SamplingOptions(temperature=0))
    ((_, copy),) = roundtrip(leader, follower, [("add", a)])
    a.finished = copy.finished = True
    roundtrip(leader, follower, [("add", seq(SamplingOptions(temperature=0)))])
    assert len(leader._by_seq) == 1 and len(follower._by_key) == 1
    # a cancel for a sequence the leader no longer tracks is not shared
    assert roundtrip(leader, follower, [("cancel", a)]) == []


def test_leader_address_comes_from_the_launchers_hostfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostfile = tmp_path / "h.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert leader_address() == "10.0.0.1"
    monkeypatch.delenv("MLX_HOSTFILE")
    monkeypatch.setenv("MLX_JACCL_COORDINATOR", "192.168.1.5:32323")
    assert leader_address() == "192.168.1.5"
    monkeypatch.delenv("MLX_JACCL_COORDINATOR")
    assert leader_address() == "127.0.0.1"


def test_hosts_setting_forms(tmp_path: Path) -> None:
    assert parse_hosts("", GIB) == []
    assert parse_hosts("10.0.0.1=1GiB, 10.0.0.2", GIB) == [HostSpec("10.0.0.1", "10.0.0.1", GIB),
                                                           HostSpec("10.0.0.2", "10.0.0.2")]
    assert parse_hosts(["a=50%", "b"], 4 * GIB) == [HostSpec("a", "a", 2 * GIB), HostSpec("b", "b")]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "studio1", "ips": ["10.0.0.1"], "memory_limit": "2GiB"},
                                    {"ssh": "studio2", "ips": ["10.0.0.2"]}]))
    assert parse_hosts(str(hostfile), GIB) == [HostSpec("studio1", "10.0.0.1", 2 * GIB),
                                               HostSpec("studio2", "10.0.0.2")]
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "a"}, {"ssh": "b"}]}))
    assert [h.ip for h in parse_hosts(str(hostfile), GIB)] == ["a", "b"]


@pytest.mark.parametrize("raw", ["10.0.0.1", "a b,c", "a=lots,b", "=1GiB,b"])
def test_bad_hosts_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_hosts(raw, GIB)


def test_an_unreadable_hostfile_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"ips\": []}]")
    with pytest.raises(BadRequest, match="cannot read hostfile"):
        parse_hosts(str(bad), GIB)
    with pytest.raises(BadRequest, match="cannot read hostfile"):
        parse_hosts(str(tmp_path / "missing.json"), GIB)


async def test_the_launcher_command_line_and_hostfile(tmp_path: Path) -> None:
    hosts = (HostSpec("127.0.0.1", "127.0.0.1"), HostSpec("studio2", "10.0.0.2"))
    r = DistributedRunner("org/m", tmp_path / "m", hosts=hosts, mode="pipeline", home=tmp_path, num_ctx=64,
                          num_parallel=2, launch=("mlx.launch",))
    r.port, r.ring_port = 4000, 5000
    argv = r.argv()
    assert argv[:7] == ["mlx.launch", "--backend", "ring", "--hostfile", str(r.hostfile_path),
                        "--starting-port", "5000"]
    rest = argv[argv.index("--") + 1:]
    assert rest[-2:] == ["--distributed", "pipeline"] and "--port" in rest and "4000" in rest
    with pytest.raises(ValueError):
        DistributedRunner("m", tmp_path, hosts=hosts[:1], home=tmp_path, num_ctx=1, num_parallel=1)


def test_consecutive_free_ports() -> None:
    first = free_port_run(3)
    assert 0 < first < 65534


def test_num_shards_is_a_load_parameter() -> None:
    assert create_parameters({"num_shards": 2, "temperature": 0.5}) == {"num_shards": 2, "temperature": 0.5}
    for bad in (0, 65, "2", True):
        with pytest.raises(BadRequest, match="num_shards"):
            create_parameters({"num_shards": bad})


def test_ps_shows_hosts_and_ranks_of_a_spread_model_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from corral.supervisor import cli
    from corral.supervisor.api.ollama import ps_row
    from corral.supervisor.scheduler import LoadedModel

    from tests.support.fake_scheduler import FakeStore, fake_manifest

    ref = FakeStore.with_models("org/big", "org/small").list()
    ranks = ({"rank": 0, "host": "127.0.0.1", "pid": 11, "memory": {"rss": 5}},
             {"rank": 1, "host": "10.0.0.2", "pid": 12, "memory": {"rss": 6}})

    def loaded(r: Any, **extra: Any) -> LoadedModel:
        return LoadedModel(name=r.name, ref=r, manifest=fake_manifest(), pid=11, state="ready", size=10,
                           size_vram=0, context_length=2048, num_parallel=1, expires_at=None, active=0,
                           pinned=False, **extra)

    spread = ps_row(loaded(ref[0], hosts=("127.0.0.1", "10.0.0.2"), ranks=ranks))
    single = ps_row(loaded(ref[1]))
    assert spread["hosts"] == ["127.0.0.1", "10.0.0.2"] and spread["ranks"] == list(ranks)
    assert "hosts" not in single and "ranks" not in single  # Ollama's shape for ordinary models

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def ps(self) -> list[dict[str, Any]]:
            return rows

    tables: list[tuple[list[str], list[list[str]]]] = []
    monkeypatch.setattr(cli, "print_table", lambda headers, body: tables.append((headers, body)))
    monkeypatch.setattr(cli, "_client", lambda args: Client())
    rows = [spread, single]
    assert cli.cmd_ps(argparse.Namespace()) == 0
    headers, body = tables[-1]
    assert headers[-1] == "HOSTS" and body[0][-1] == "127.0.0.1,10.0.0.2" and body[1][-1] == ""
    rows = [single]
    cli.cmd_ps(argparse.Namespace())
    assert "HOSTS" not in tables[-1][0]
