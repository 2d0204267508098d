"""What the benchmark reads from /proc about the machine and the arms: steal, and when an arm is quiet."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import procstats

BUSY_THEN_IDLE = "import time\nend = time.monotonic() + {busy}\nwhile time.monotonic() < end: pass\ntime.sleep(30)"


def test_steal_share_reads_a_delta_of_one_core() -> None:
    before = procstats.core_ticks(None)
    assert before[1] > 0 and 0 <= before[0] <= before[1]
    assert procstats.steal_share((10, 1000), (60, 2000)) == 0.05
    assert procstats.steal_share((10, 1000), (10, 1000)) == 0.0
    with pytest.raises(LookupError):
        procstats.core_ticks(10_000)


@pytest.mark.timeout(30)
def test_settle_waits_for_an_arm_to_finish_its_backlog() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE.format(busy=0.6)])
    try:
        time.sleep(0.1)
        started = time.monotonic()
        assert procstats.settle([proc.pid])
        assert time.monotonic() - started >= 0.3  # it waited through the busy part
        assert procstats.on_cpu_ns([proc.pid]) >= 0.4e9
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(30)
def test_settle_gives_up_on_an_arm_that_stays_busy() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE.format(busy=20)])
    try:
        started = time.monotonic()
        assert not procstats.settle([proc.pid], limit_s=0.5)
        assert 0.5 <= time.monotonic() - started < 2
    finally:
        proc.kill()
        proc.wait()
