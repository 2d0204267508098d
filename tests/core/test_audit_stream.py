"""Audit lines leave in one write per event-loop turn, promptly, also under ``python -u``.

The image's launcher runs ``python -IBu``; under ``-u`` ``sys.stdout`` writes
through, which cost one syscall per request's audit line. A timer-driven flush
would instead lose the last second's lines when the sidecar is killed. These
tests run a real interpreter with ``-u`` on a pipe and look at what reached the
pipe, and when.
"""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys

from sidekey.core import logs

_SCRIPT = """
import asyncio, sys
from sidekey.core import logs

def say(word):
    sys.stderr.write(word + "\\n"); sys.stderr.flush()
    sys.stdin.readline()          # the test looks at the pipe

async def main():
    writer = logs.AuditWriter()
    for i in range(200):          # one loop turn's lines
        writer.write_line('{"n":%d}\\n' % i)
        writer.write({"m": i})
    say("written")
    await asyncio.sleep(0)        # the next turn
    say("next turn")

asyncio.run(main())
"""


def _read_lines(fd: int, count: int) -> list[str]:
    data = b""
    while len(data.splitlines()) < count:
        readable, _, _ = select.select([fd], [], [], 5)
        assert readable, data[-200:]
        data += os.read(fd, 1 << 16)
    return data.decode().splitlines()


def test_one_turns_lines_reach_stdout_together_at_the_next_turn_under_python_u() -> None:
    proc = subprocess.Popen([sys.executable, "-u", "-c", _SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdin is not None and proc.stdout is not None
        assert proc.stderr.readline() == "written\n"
        readable, _, _ = select.select([proc.stdout], [], [], 0.3)
        assert readable == [], "audit lines were written through, one syscall each"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stderr.readline() == "next turn\n"
        os.set_blocking(proc.stdout.fileno(), False)
        lines = _read_lines(proc.stdout.fileno(), 400)  # all of them, without any timer
        assert lines[:4] == ['{"n":0}', '{"m":0}', '{"n":1}', '{"m":1}']
        assert lines[-1] == '{"m":199}' and len(lines) == 400
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_without_a_loop_lines_wait_for_flush() -> None:
    stream = io.StringIO()
    writer = logs.AuditWriter(stream)
    writer.write({"a": 1})
    assert stream.getvalue() == '{"a":1}\n'  # a StringIO has no buffer to hold it; flush is harmless
    writer.flush()
    assert stream.getvalue() == '{"a":1}\n'


def test_a_stdout_without_a_descriptor_is_used_as_it_is() -> None:
    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        writer = logs.AuditWriter()
        writer.write({"a": 1})
        writer.flush()
        assert sys.stdout.getvalue() == '{"a":1}\n'
    finally:
        sys.stdout = saved
