"""Child processes that never outlive their parent.

The control plane, and the demo's operator, webhook and sidecars, all run as
children with their output in a log file. Each asks the kernel for SIGTERM
when its parent dies, so a crashed test run or a killed demo leaves nothing
behind; a normal exit stops them in reverse order of start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


class ProcessExited(RuntimeError):
    """A child exited when it should be running; the message has its log's tail."""


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()  # Ctrl-C in a terminal reaches the parent only, which stops children in order


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _log_file: IO[bytes]

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.lines()[-lines:])

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.running:
            raise ProcessExited(f"{self.name} exited with {self.popen.returncode}; log {self.log}:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_file.close()
        return int(self.popen.returncode)


@dataclass
class Processes:
    """Starts named children; stops them all, newest first, on exit."""

    log_dir: Path
    # A cgroup (v2 or a v1 hierarchy's folder) every child is started in, so
    # that a netfilter rule can match their traffic (the node's egress guard).
    cgroup: Path | None = None
    _procs: list[Process] = field(default_factory=list)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        log_file = log.open("ab")
        cgroup = self.cgroup

        def before_exec() -> None:
            _die_with_parent()
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        popen = subprocess.Popen(
            list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            preexec_fn=before_exec,
        )
        proc = Process(name, popen, log, log_file)
        self._procs.append(proc)
        return proc

    def get(self, name: str) -> Process:
        return next(p for p in self._procs if p.name == name)

    def alive(self) -> bool:
        """True while every child runs; raises with the log of the first that died."""
        for p in self._procs:
            p.check_alive()
        return True

    def all_output(self) -> list[str]:
        return [line for p in self._procs for line in p.lines()]

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
