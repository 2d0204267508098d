"""A serviceAccount budget seen from one sidecar: spend from a held slice, ask for more when low.

The ledger (``core/llmledger``) lives in a Lease the operator created. This
sidecar reads it, computes the next ledger (its report, maybe a grant) and
writes it back with the ``resourceVersion`` it read; a 409 means another
sidecar wrote first, so it reads again. Requests never wait on the
apiserver while the slice lasts: a write happens when the slice runs low
(``REFILL_BELOW``), and as a heartbeat while this sidecar holds something.

Safety when the apiserver is away: the slice is valid only for the Lease's
``leaseDurationSeconds`` (less a margin) after the last write that
succeeded, because after that the operator may hand it to others. So a cut
off sidecar spends at most what it holds, and stops when the slice would be
reclaimed; it never makes up a grant.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

from sidekey.core import errors, httpclient, kubeapi, llmledger, llmpolicy
from sidekey.proxy import llmbudgets

log = logging.getLogger("sidekey.proxy.llm")

#: Ask for the next slice when less than this fraction of one is left.
REFILL_BELOW: Final = 0.25
#: Attempts at one compare-and-swap before giving up for now.
CAS_ATTEMPTS: Final = 8


class LedgerUnavailable(errors.Unavailable):
    """The Lease is missing, unreadable or unreachable: spend only what is held."""


def lease_path(namespace: str, name: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"


class SharedAccount(llmbudgets.Account):
    """An Account whose limit is what the ledger granted this pod in the current window."""

    __slots__ = ("_adopted", "_api", "_lease", "_lock", "_mono", "_path", "_refill", "_valid_until",
                 "holder", "holder_seconds", "pod", "slice", "unavailable", "writes")

    def __init__(self, budget: llmpolicy.Budget, *, api: kubeapi.ApiClient, namespace: str, lease: str,
                 holder: str, pod: str, clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        super().__init__(budget, clock=clock)
        self._api = api
        self._path = lease_path(namespace, lease)
        self.holder = holder  # the pod's uid: a restarted sidecar finds its entry
        self.pod = pod
        self.slice = llmledger.slice_size(budget.tokens)
        self.holder_seconds = float(llmledger.DEFAULT_HOLDER_SECONDS)
        self._mono = mono
        self._valid_until = 0.0
        self._lease: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._adopted = False
        self._refill: asyncio.Task[None] | None = None
        self.writes = 0
        #: Why the last talk to the ledger failed (None: it worked).
        self.unavailable: str | None = None

    def initial_limit(self) -> int:
        return 0  # nothing is held until the ledger grants it

    def shortfall(self) -> str:
        if self.unavailable is None:
            return ""
        return f"; this pod holds only what the ledger granted before: {self.unavailable}"

    def rebudget(self, budget: llmpolicy.Budget) -> None:
        """A new total: the ledger (rebudgeted by the operator) decides the grants; only the slice moves."""
        self.budget = budget
        self.slice = llmledger.slice_size(budget.tokens)

    @property
    def valid(self) -> bool:
        return self._mono() < self._valid_until

    def left(self) -> int:
        left = super().left()
        return left if self.valid else min(left, 0)

    @property
    def used(self) -> int:
        return self.spent + self.reserved

    # --- talking to the ledger ------------------------------------------------------

    async def ensure(self, need: int, *, want: int | None = None) -> None:
        """Hold at least ``need`` tokens if the ledger can give them, ``want`` if it can (no-op when held)."""
        hope = max(need, want or need)
        if self.left() >= hope:
            return
        async with self._lock:
            try:
                if not self._adopted:
                    # first contact (or a restart): take over what the ledger says this pod holds
                    await self.sync(want=0, need=0)
                left = self.left()
                if left >= hope:
                    return
                await self.sync(want=max(self.slice, hope - left), need=max(0, need - left))
            except LedgerUnavailable as exc:
                self.unavailable = str(exc)
                log.warning("budget ledger %s: %s; spending only what is held", self._path, exc)

    def refill_soon(self) -> None:
        """After a reservation: ask for the next slice in the background when running low."""
        if self.left() >= self.slice * REFILL_BELOW or (self._refill is not None and not self._refill.done()):
            return
        self._refill = asyncio.get_running_loop().create_task(self.ensure(int(self.slice * REFILL_BELOW) + 1))

    async def heartbeat(self) -> None:
        """Report the use (and renew the slice) now."""
        async with self._lock:
            await self.sync(want=0, need=0)

    async def run(self) -> None:
        """Forever: heartbeat while something is held or used, a quarter of the holder timeout apart."""
        while True:
            await asyncio.sleep(self.holder_seconds * llmledger.HEARTBEAT_FRACTION * random.uniform(0.9, 1.0))
            self.roll()
            if self.limit == 0 and self.used == 0:
                continue
            try:
                await self.heartbeat()
            except LedgerUnavailable as exc:
                log.warning("budget ledger %s: %s", self._path, exc)

    async def release(self) -> None:
        """On shutdown: hand the unspent slice back at once."""
        async with self._lock:
            await self._exchange(lambda led: (llmledger.release(led, self.holder, used=self.used,
                                                                now=self.now()), 0))
            self.limit = self.used
            self._valid_until = 0.0

    async def sync(self, *, want: int, need: int) -> int:
        """Report, and take up to ``want`` more (nothing if less than ``need``); the grant."""
        window = self.roll()

        def step(led: llmledger.Ledger) -> tuple[llmledger.Ledger, int]:
            now = self.now()
            current = llmledger.rolled(led, now)
            mine = current.holders.get(self.holder)
            if not self._adopted and mine is not None and current.window == window:
                # a restarted sidecar: what this pod used before counts, no fresh budget
                self.spent = max(self.spent, mine.used - self.reserved)
            return llmledger.take(current, self.holder, self.pod, used=self.used, want=want, need=need, now=now)

        led, given = await self._exchange(step)
        self._adopted = True
        mine = led.holders.get(self.holder)
        if led.window == self.window and mine is not None:
            self.limit = mine.granted
        return given

    async def _exchange(self, step: Callable[[llmledger.Ledger], tuple[llmledger.Ledger, int]]
                        ) -> tuple[llmledger.Ledger, int]:
        """Read-compute-write with the read resourceVersion, retried on 409."""
        for attempt in range(CAS_ATTEMPTS):
            lease = self._lease
            if lease is None or attempt > 0:
                lease = await self._read()
            annotations = (lease.get("metadata") or {}).get("annotations") or {}
            try:
                led = llmledger.loads(str(annotations.get(llmledger.ANNOTATION, "")))
            except llmledger.LedgerError as exc:
                raise LedgerUnavailable(str(exc)) from None
            duration = (lease.get("spec") or {}).get("leaseDurationSeconds")
            if isinstance(duration, int) and duration > 0:
                self.holder_seconds = float(duration)
            new, result = step(led)
            body = dict(lease)
            body["metadata"] = {**lease["metadata"],
                                "annotations": {**annotations, llmledger.ANNOTATION: llmledger.dumps(new)}}
            started = self._mono()
            try:
                self._lease = await self._api.request("PUT", self._path, body=body)
            except kubeapi.ApiError as exc:
                if exc.status == 409:
                    await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))
                    continue
                raise LedgerUnavailable(f"{exc.status} {exc.reason}") from None
            except (httpclient.HttpError, OSError, TimeoutError) as exc:
                raise LedgerUnavailable(type(exc).__name__) from None
            self.writes += 1
            self.unavailable = None
            self._valid_until = started + self.holder_seconds * (1 - llmledger.SAFETY_MARGIN_FRACTION)
            return new, result
        raise LedgerUnavailable(f"{CAS_ATTEMPTS} conflicting writes in a row")

    async def _read(self) -> dict[str, Any]:
        try:
            return await self._api.request("GET", self._path)
        except kubeapi.ApiError as exc:
            if exc.status == 404:
                raise LedgerUnavailable("the operator has not created the ledger Lease yet") from None
            raise LedgerUnavailable(f"{exc.status} {exc.reason}") from None
        except (httpclient.HttpError, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(type(exc).__name__) from None
