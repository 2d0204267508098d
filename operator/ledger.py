"""The operator's side of serviceAccount budgets: keep the ledger Leases and report the spend.

For every policy budget with ``scope: serviceAccount`` and every subject
account there is one Lease (``core/llmledger`` holds the format). This
keeper, a background task next to the reconcile queue, every few seconds:

- creates the missing Leases (owned by the policy, so the garbage collector
  removes them with it; no finalizer);
- writes a changed budget (tokens, window) into the ledger;
- reclaims the slices of holders unseen for the Lease's
  ``leaseDurationSeconds``, so a dead sidecar's unspent slice comes back;
- replaces a ledger it cannot read with one that is fully spent until the
  window ends (and says so in a Warning Event on the Lease): what was spent
  is unknown, and counting it as nothing could grant the budget twice;
- writes ``status.budgets`` (spend per budget, in its window) and
  ``status.spend`` (the Spend column) when they changed.

Every write carries the ``resourceVersion`` it read, like the sidecars'
writes: a 409 means a sidecar wrote first, and the next tick looks again.
Only this task writes ``status.budgets`` and ``status.spend``; the reconcile
writes the conditions, and a merge patch of one leaves the other alone.

On shutdown a pass that has begun is let finish (``stop``, then ``idle``), so
no write is left half-sent. Cutting one short would lose nothing either: the
next instance recomputes every write from the Leases, and the Warning Event on
an unreadable ledger is posted before the write that replaces it, so a cut
between the two posts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp

from sidekey.core import contract, kubeapi, llmledger, policies, reflector
from sidekey.operator import kubeobjects, recording, rest

log = logging.getLogger(__name__)

#: Seconds between two passes over the ledgers.
INTERVAL: Final = 5.0
#: The CRD's bound on status.budgets (the Leases hold every budget whatever the status shows).
MAX_STATUS_ENTRIES: Final = 2048
#: Least seconds between two spend reports of one policy (each one wakes the reconcile).
REPORT_EVERY: Final = 15.0
LEASES: Final = "/apis/coordination.k8s.io/v1/leases"


def lease_path(namespace: str, name: str = "") -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases" + (f"/{name}" if name else "")


def new_lease(place: llmledger.Place, policy: policies.AgentPolicy, now: float,
              holder_seconds: int = llmledger.DEFAULT_HOLDER_SECONDS) -> dict[str, Any]:
    led = llmledger.new(place.budget.tokens, place.budget.window_seconds, now)
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": place.name, "namespace": place.namespace,
            "labels": {llmledger.LABEL: "true", contract.LABEL_MANAGED_BY: contract.MANAGED_BY},
            "annotations": {
                llmledger.ANNOTATION: llmledger.dumps(led),
                "sidekey.io/budget": (f"AgentPolicy {place.policy}, upstream {place.upstream}, "
                                      f"budgets[{place.index}], service account {place.service_account}"),
            },
            "ownerReferences": [{"apiVersion": contract.API_VERSION, "kind": contract.KIND,
                                 "name": policy.name, "uid": policy.uid, "controller": True}],
        },
        "spec": {"leaseDurationSeconds": holder_seconds},
    }


def _ledger_of(lease: Mapping[str, Any]) -> llmledger.Ledger | None:
    text = ((lease.get("metadata") or {}).get("annotations") or {}).get(llmledger.ANNOTATION)
    try:
        return llmledger.loads(str(text or ""))
    except llmledger.LedgerError:
        return None


def spent_out(place: llmledger.Place, now: float) -> llmledger.Ledger:
    """The ledger that replaces an unreadable one: this window's budget, all of it spent.

    Nothing is granted from it until the window ends (``rolled`` then starts
    the next one at zero). The sidecars spend at most the slices they hold.
    """
    led = llmledger.new(place.budget.tokens, place.budget.window_seconds, now)
    return dataclasses.replace(led, retired=led.tokens)


def lease_reference(lease: Mapping[str, Any]) -> kubeobjects.ObjectReference:
    meta = lease.get("metadata") or {}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": str(meta.get("name", "")),
            "namespace": str(meta.get("namespace", "")), "uid": str(meta.get("uid", ""))}


def holder_seconds(lease: Mapping[str, Any]) -> int:
    value = (lease.get("spec") or {}).get("leaseDurationSeconds")
    return value if isinstance(value, int) and value > 0 else llmledger.DEFAULT_HOLDER_SECONDS


def status_entry(place: llmledger.Place, led: llmledger.Ledger) -> dict[str, Any]:
    return {
        "upstream": place.upstream, "serviceAccount": place.service_account, "scope": place.budget.scope,
        "window": place.budget.window,
        "windowStart": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(led.window)),
        "tokens": led.tokens, "spent": led.spent, "granted": led.granted,
        "holders": len(led.holders), "lease": place.name,
    }


def spend_column(entries: list[dict[str, Any]]) -> str:
    """The most spent budget, for ``kubectl get``: ``1200/100000 per 24h (openai/agent)``."""
    if not entries:
        return ""
    top = max(entries, key=lambda e: e["spent"] / max(1, e["tokens"]))
    return f"{top['spent']}/{top['tokens']} per {top['window']} ({top['upstream']}/{top['serviceAccount']})"


class LedgerKeeper:
    """Creates, reclaims and reports the ledgers; ``run`` until cancelled."""

    def __init__(self, api: rest.Rest, *, interval: float = INTERVAL, report_every: float = REPORT_EVERY,
                 clock: Callable[[], float] = time.time, recorder: recording.Recorder | None = None) -> None:
        self._api = api
        self._recorder = recorder or recording.Recorder(api)
        self._warned: dict[str, str] = {}  # Lease key -> the resourceVersion whose ledger was unreadable
        self._interval = interval
        self._report_every = report_every
        self._reported: dict[str, float] = {}  # policy uid -> monotonic time of the last report
        self._clock = clock
        self.policies = reflector.Reflector(api, f"/apis/{contract.GROUP}/{contract.VERSION}/{contract.PLURAL}")
        self.leases = reflector.Reflector(api, LEASES, label_selector=f"{llmledger.LABEL}=true")
        self.reclaimed = 0  # holders reclaimed since start (tests and logs)
        #: Set while no pass runs: on shutdown the task is cancelled once it is (``stop``).
        self.idle = asyncio.Event()
        self.idle.set()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Start no further pass; the one running (if any) finishes, then ``run`` returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Pass over the ledgers every ``interval`` until cancelled, or until ``stop`` was called.

        A pass is never started after ``stop``; ``idle`` is clear while one runs.
        """
        watches = [asyncio.create_task(self.policies.run(), name="ledger-policies"),
                   asyncio.create_task(self.leases.run(), name="ledger-leases")]
        try:
            await self.policies.synced.wait()
            await self.leases.synced.wait()
            while not self._stopping.is_set():
                self.idle.clear()
                try:
                    await self.tick()
                except (kubeapi.ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("budget ledgers: %s", exc)
                except Exception:  # a bug must not end the task: /healthz would fail and restart the operator
                    log.exception("budget ledgers: the pass failed; the next one runs in %s s", self._interval)
                finally:
                    self.idle.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._stopping.wait()
        finally:
            for t in watches:
                t.cancel()
            await asyncio.gather(*watches, return_exceptions=True)

    async def tick(self) -> None:
        """One pass over every policy; a policy whose step fails is logged and the pass goes on."""
        now = self._clock()
        for raw in list(self.policies.objects.values()):
            meta = raw.get("metadata") or {}
            where = f"AgentPolicy {meta.get('namespace')}/{meta.get('name')}"
            try:
                await self._keep_policy(raw, now)
            except (kubeapi.ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("budget ledgers of %s: %s", where, exc)
            except Exception:  # one bad policy must not stop the ledgers of the others
                log.exception("budget ledgers of %s: this pass skips it", where)

    async def _keep_policy(self, raw: Mapping[str, Any], now: float) -> None:
        try:
            policy = policies.parse(policies.raw(raw))
        except policies.PolicyError:
            return
        places = llmledger.places(policy)
        if not places and not (raw.get("status") or {}).get("budgets"):
            return
        entries: list[dict[str, Any]] = []
        for place in places:
            led = await self._keep(place, policy, now)
            if led is not None:
                entries.append(status_entry(place, led))
        await self._report(raw, entries[:MAX_STATUS_ENTRIES])

    async def _keep(self, place: llmledger.Place, policy: policies.AgentPolicy, now: float
                    ) -> llmledger.Ledger | None:
        lease = self.leases.objects.get(f"{place.namespace}/{place.name}")
        if lease is None:
            body = new_lease(place, policy, now)
            try:
                created = await self._api.create(lease_path(place.namespace), body)
            except kubeapi.ApiError as exc:
                if exc.status != 409:  # 409: it exists, the watch will bring it
                    log.warning("cannot create budget Lease %s/%s: %s", place.namespace, place.name, exc)
                return None
            self.leases.objects[f"{place.namespace}/{place.name}"] = created
            return _ledger_of(created)
        led = _ledger_of(lease)
        if led is None:
            # unreadable: what was spent is unknown, so all of it was (fail closed until the window ends)
            led = spent_out(place, now)
            await self._warn_unreadable(place, lease, led)
        new = llmledger.rolled(led, now)
        if (new.tokens, new.window_seconds) != (place.budget.tokens, place.budget.window_seconds):
            new = llmledger.rebudgeted(new, place.budget.tokens, place.budget.window_seconds, now)
        new, gone = llmledger.reclaim(new, now, holder_seconds(lease))
        if new == led and _ledger_of(lease) is not None:
            return led
        body = dict(lease)
        annotations = dict((lease.get("metadata") or {}).get("annotations") or {})
        annotations[llmledger.ANNOTATION] = llmledger.dumps(new)
        body["metadata"] = {**lease["metadata"], "annotations": annotations}
        try:
            written = await self._api.replace(lease_path(place.namespace, place.name), body)
        except kubeapi.ApiError as exc:
            if exc.status in (404, 409):
                return led  # a sidecar wrote first (or it is gone): look again next tick
            raise
        self.leases.objects[f"{place.namespace}/{place.name}"] = written
        if gone:
            self.reclaimed += len(gone)
            log.info("budget Lease %s/%s: reclaimed the unspent slices of %d silent holder(s)",
                     place.namespace, place.name, len(gone))
        return new

    async def _warn_unreadable(self, place: llmledger.Place, lease: Mapping[str, Any],
                               led: llmledger.Ledger) -> None:
        """Log and post one Warning Event per unreadable version of a Lease (its content is never quoted)."""
        key = f"{place.namespace}/{place.name}"
        version = str((lease.get("metadata") or {}).get("resourceVersion", ""))
        if self._warned.get(key) == version:
            return
        self._warned[key] = version
        ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(led.window + led.window_seconds))
        message = (f"annotation {llmledger.ANNOTATION} of budget Lease {key} (AgentPolicy {place.policy}, "
                   f"upstream {place.upstream}, service account {place.service_account}) is not a ledger the "
                   f"operator can read: the budget counts as fully spent until its window ends at {ends}")
        log.warning("%s", message)
        await self._recorder.post(lease_reference(lease), "Warning", "LedgerUnreadable", message)

    async def _report(self, raw: Mapping[str, Any], entries: list[dict[str, Any]]) -> None:
        status = raw.get("status") or {}
        spend = spend_column(entries)
        if status.get("budgets") == entries and status.get("spend", "") == spend:
            return
        meta = raw.get("metadata") or {}
        uid, mono = str(meta.get("uid", "")), time.monotonic()
        same_shape = [e.get("lease") for e in status.get("budgets") or []] == [e["lease"] for e in entries]
        if same_shape and mono - self._reported.get(uid, -1e9) < self._report_every:
            return
        self._reported[uid] = mono
        try:
            await self._api.patch(
                rest.policy_path(str(meta.get("namespace")), str(meta.get("name"))) + "/status",
                {"status": {"budgets": entries, "spend": spend or None}}, "merge")
        except kubeapi.ApiError as exc:
            if exc.status != 404:
                raise
