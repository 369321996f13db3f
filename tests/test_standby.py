"""The standby runner: spawned ahead of need with its imports done, adopted for a model.

Real `python -m corral.runner --model -` subprocesses and real mlx on the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psutil
from corral.supervisor.process import RunnerState, StandbyFactory
from corral.supervisor.scheduler import RunnerSpec

ROOT = Path(__file__).resolve().parents[1]


async def _wait_spare(factory: StandbyFactory) -> None:
    for _ in range(600):
        if factory._spare is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no standby was spawned")


async def test_factory_adopts_the_spare_and_refills(tiny_model: Path, tmp_path: Path) -> None:
    factory = StandbyFactory(tmp_path)
    factory.refill()
    await _wait_spare(factory)
    spare = factory._spare
    assert spare is not None and spare.standby
    spare_pid = spare.pid
    runner = factory(RunnerSpec("corral-test/tiny", tiny_model, tmp_path, 128, 2))
    assert runner.pid == spare_pid, "the spare process was not the one adopted"
    try:
        await runner.start(timeout=60)
        assert runner.state is RunnerState.READY
        status = await runner.client.status()
        assert status["model"] == "corral-test/tiny"
        assert status["context_length"] == 128 and status["num_parallel"] == 2
        lines = [line async for line in runner.client.completion(
            {"prompt": "Hello", "options": {"temperature": 0, "num_predict": 4}})]
        assert lines[-1]["done"] and lines[-1]["eval_count"] == 4
        record = json.loads(runner.record_path.read_text())
        assert record["model"] == "corral-test/tiny" and record["model_dir"] == str(tiny_model)
        assert "loaded" in runner.log_path.read_text()  # the adopted runner logs under its model's name
        await _wait_spare(factory)  # a new spare was spawned for the next load
        assert factory._spare is not None and factory._spare.pid != spare_pid
        next_spare = factory._spare.pid
    finally:
        await runner.stop()
        await factory.aclose()
    assert not psutil.pid_exists(spare_pid)
    assert not psutil.pid_exists(next_spare), "aclose left the spare running"


async def test_a_dead_spare_is_replaced_by_a_fresh_runner(tiny_model: Path, tmp_path: Path) -> None:
    factory = StandbyFactory(tmp_path)
    factory.refill()
    await _wait_spare(factory)
    assert factory._spare is not None
    factory._spare._signal(9)
    await factory._spare.wait_exited(10)
    runner = factory(RunnerSpec("corral-test/tiny", tiny_model, tmp_path, 128, 1))
    try:
        assert not runner.standby
        await runner.start(timeout=60)
        assert runner.state is RunnerState.READY
    finally:
        await runner.stop()
        await factory.aclose()


def test_standby_exits_cleanly_without_a_model_and_fails_on_a_bad_one() -> None:
    cmd = [sys.executable, "-m", "corral.runner", "--model", "-", "--port", "1"]
    empty = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert empty.returncode == 0
    bad = subprocess.run(cmd, input="not json\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("runner: error: standby: bad model assignment")
    missing = subprocess.run(cmd, input=json.dumps({"model": "/nonexistent"}) + "\n",
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode != 0 and "runner: error:" in missing.stderr.strip().splitlines()[-1]
