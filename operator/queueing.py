"""A keyed work queue: each key is reconciled by one worker at a time.

kopf delivers watch events for AgentPolicies, Secrets and Pods; several of
them can call for the same policy at once (a Secret named by two policies, a
policy whose change alters its neighbours' conflicts). The queue folds those
into one pending entry per key, never runs one key twice concurrently (a
change that arrives mid-run schedules exactly one more run), and retries
failures with capped exponential backoff and jitter so a flapping apiserver
is not hammered. Nothing here is a kopf timer or daemon, so no AgentPolicy
ever gets a finalizer.

On shutdown ``close`` closes the queue: the runs already started finish (a
status write and the Events of its transitions go out together, see
``Controller.reconcile``), while the keys still waiting, for a worker or for
a retry's backoff, are dropped. Nothing is lost by that: the next instance
reconciles every policy on its first listing (kopf delivers each one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)


class Retry(Exception):
    """Raised by a worker to ask for another run after a backoff."""


class Queue(Generic[K]):
    def __init__(self, work: Callable[[K], Awaitable[None]], *, workers: int = 4,
                 base_delay: float = 0.5, max_delay: float = 60.0) -> None:
        self._work = work
        self._workers = workers
        self._base = base_delay
        self._max = max_delay
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        self._again: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def add(self, key: K) -> None:
        """Reconcile ``key`` soon (at most once more, however often it is added)."""
        if self._closed:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._running:
            self._again.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._idle.clear()
        self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        if self._closed or key in self._timers or key in self._queued:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)
        self._idle.clear()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def backoff(self, failures: int) -> float:
        delay = min(self._max, self._base * (2 ** max(0, failures - 1)))
        return float(delay * random.uniform(0.8, 1.2))

    @property
    def depth(self) -> int:
        return len(self._queued) + len(self._running) + len(self._timers)

    async def wait_idle(self) -> None:
        """Until nothing is queued, running or waiting for a retry (tests, and the shutdown)."""
        await self._idle.wait()

    def close(self) -> None:
        """Take no more work and drop what waits (queued, or in a retry's backoff).

        The runs already started go on: ``wait_idle`` returns once they have
        finished, and cancelling ``run`` then only interrupts idle workers.
        """
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._again.clear()
        self._queued.clear()
        while not self._ready.empty():
            self._ready.get_nowait()
            self._ready.task_done()
        if not self._running:
            self._idle.set()

    @property
    def running(self) -> frozenset[K]:
        """The keys a worker is reconciling now."""
        return frozenset(self._running)

    async def run(self) -> None:
        """Run the workers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(self._workers):
                group.create_task(self._worker(), name=f"reconcile-worker-{i}")

    async def _worker(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._running.add(key)
            started = time.monotonic()
            try:
                await self._work(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = self.backoff(failures)
                if not isinstance(exc, Retry):
                    log.exception("reconcile of %s failed; retrying in %.1fs", key, delay)
                else:
                    log.info("reconcile of %s: %s; retrying in %.1fs", key, exc, delay)
                self._running.discard(key)
                if key in self._again:  # the world changed meanwhile: try that at once
                    self._again.discard(key)
                    self.add(key)
                else:
                    self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                self._running.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
            finally:
                log.debug("reconciled %s in %.3fs", key, time.monotonic() - started)
                self._ready.task_done()
                if not (self._queued or self._running or self._timers):
                    self._idle.set()
