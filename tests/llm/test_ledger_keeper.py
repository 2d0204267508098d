"""The operator's ledger keeper, one tick at a time, against an in-memory apiserver.

What is tested here is the keeper's own choices when something is wrong (a
ledger it cannot read, a step that raises), which the real apiserver in
test_shared_budgets.py cannot easily be made to produce on cue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from sidekey.core import kubeapi, llmledger, policies
from sidekey.operator import ledger, rest

NOW = 1_764_590_000.0  # inside the UTC day that starts at 1_764_547_200


class MemoryApi:
    """create, replace and patch on a dict of objects by path; optionally one path fails."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.patches: list[tuple[str, Any]] = []
        self.rv = 10
        self.fail: dict[str, BaseException] = {}  # path prefix -> what a write there raises

    def _check(self, path: str) -> None:
        for prefix, exc in self.fail.items():
            if path.startswith(prefix):
                raise exc

    async def create(self, path: str, body: Any) -> dict[str, Any]:
        self._check(path)
        if path.endswith("/events"):
            self.events.append(body)
            return cast(dict[str, Any], body)
        self.rv += 1
        obj = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv), "uid": f"uid-{self.rv}"}}
        self.objects[f"{path}/{body['metadata']['name']}"] = obj
        return obj

    async def replace(self, path: str, body: Any) -> dict[str, Any]:
        self._check(path)
        self.rv += 1
        obj = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        self.objects[path] = obj
        return obj

    async def patch(self, path: str, body: Any, kind: str = "merge") -> dict[str, Any]:
        self._check(path)
        self.patches.append((path, body))
        return {}


def agent_policy(name: str, namespace: str, tokens: int = 10_000) -> dict[str, Any]:
    return {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
                "name": "openai", "url": "https://api.openai.com/v1", "api": "openai",
                "auth": {"type": "bearer", "secretRef": {"name": "k", "key": "k"}},
                "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
                "budgets": [{"tokens": tokens, "window": "24h", "scope": "serviceAccount"}]}]}}


def keeper_with(api: MemoryApi, *raws: dict[str, Any]) -> ledger.LedgerKeeper:
    keeper = ledger.LedgerKeeper(cast(rest.Rest, api), report_every=0.0, clock=lambda: NOW)
    for raw in raws:
        keeper.policies.objects[f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"] = raw
    return keeper


def place_of(raw: dict[str, Any]) -> llmledger.Place:
    [place] = llmledger.places(policies.parse(policies.raw(raw)))
    return place


def lease_with(place: llmledger.Place, annotation: str) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": place.name, "namespace": place.namespace, "uid": "uid-lease",
                         "resourceVersion": "5", "labels": {llmledger.LABEL: "true"},
                         "annotations": {llmledger.ANNOTATION: annotation}},
            "spec": {"leaseDurationSeconds": 120}}


def ledger_in(obj: dict[str, Any]) -> llmledger.Ledger:
    return llmledger.loads(obj["metadata"]["annotations"][llmledger.ANNOTATION])


@pytest.mark.parametrize("annotation", ['{"v":1,"tokens":"lots"}', "not json", '{"v":2}', ""])
async def test_an_unreadable_ledger_counts_as_fully_spent_until_its_window_ends(annotation: str) -> None:
    api = MemoryApi()
    raw = agent_policy("p", "team")
    place = place_of(raw)
    keeper = keeper_with(api, raw)
    keeper.leases.objects[f"team/{place.name}"] = lease_with(place, annotation)

    await keeper.tick()

    written = ledger_in(api.objects[ledger.lease_path("team", place.name)])
    assert (written.tokens, written.spent, written.available) == (10_000, 10_000, 0)
    assert written.window == 1_764_547_200  # this window: the next one starts at zero again
    assert llmledger.rolled(written, NOW + 86_400).available == 10_000
    # a sidecar asking for a slice now gets nothing
    _, given = llmledger.take(written, "uid-pod", "pod", used=0, want=500, need=1, now=NOW + 1)
    assert given == 0
    [event] = api.events
    assert event["type"] == "Warning" and event["reason"] == "LedgerUnreadable"
    assert event["involvedObject"] == {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                       "name": place.name, "namespace": "team", "uid": "uid-lease"}
    assert place.name in event["message"] and "fully spent" in event["message"]
    if annotation:
        assert annotation not in event["message"]  # the annotation's content is never quoted
    [(_, patch)] = api.patches
    assert patch["status"]["budgets"][0]["spent"] == 10_000


async def test_an_unreadable_ledger_is_warned_about_once_per_version() -> None:
    api = MemoryApi()
    raw = agent_policy("p", "team")
    place = place_of(raw)
    keeper = keeper_with(api, raw)
    api.fail[ledger.lease_path("team")] = kubeapi.ApiError(409, "Conflict", "a sidecar wrote first")
    keeper.leases.objects[f"team/{place.name}"] = lease_with(place, "not json")
    await keeper.tick()
    await keeper.tick()  # the write lost the race: the same version is still unreadable
    assert len(api.events) == 1


async def test_one_policy_whose_step_raises_does_not_stop_the_others() -> None:
    api = MemoryApi()
    broken, fine = agent_policy("broken", "a-team"), agent_policy("fine", "b-team")
    api.fail[ledger.lease_path("a-team")] = RuntimeError("a bug in one step")
    keeper = keeper_with(api, broken, fine)

    await keeper.tick()  # must not raise: the keeper task would end with it

    created = api.objects[f"{ledger.lease_path('b-team')}/{place_of(fine).name}"]
    assert ledger_in(created).tokens == 10_000
    assert [path for path, _ in api.patches] == [rest.policy_path("b-team", "fine") + "/status"]


def _passes_by(monkeypatch: pytest.MonkeyPatch, keeper: ledger.LedgerKeeper,
               tick: Callable[[], Awaitable[None]]) -> None:
    """The keeper's watches report synced at once, with no apiserver, and each of its passes is ``tick``."""

    async def synced_watch() -> None:
        keeper.policies.synced.set()
        keeper.leases.synced.set()

    monkeypatch.setattr(keeper, "tick", tick)
    monkeypatch.setattr(keeper.policies, "run", synced_watch)
    monkeypatch.setattr(keeper.leases, "run", synced_watch)


async def test_the_keeper_keeps_running_after_a_tick_that_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    api = MemoryApi()
    keeper = ledger.LedgerKeeper(cast(rest.Rest, api), interval=0.0)
    ticks: list[int] = []

    async def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            raise KeyError("something no one expected")
        if len(ticks) == 3:
            raise asyncio.CancelledError  # the operator stopping

    _passes_by(monkeypatch, keeper, tick)
    with pytest.raises(asyncio.CancelledError):
        await keeper.run()
    assert ticks == [0, 1, 2]



async def test_stop_lets_the_running_pass_finish_and_starts_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()
    ticks: list[int] = []

    async def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            await gate.wait()  # a pass in the middle of its writes

    def started_keeper() -> tuple[ledger.LedgerKeeper, asyncio.Task[None]]:
        keeper = ledger.LedgerKeeper(cast(rest.Rest, MemoryApi()), interval=60.0)
        _passes_by(monkeypatch, keeper, tick)
        return keeper, asyncio.create_task(keeper.run())

    keeper, task = started_keeper()
    while not ticks:
        await asyncio.sleep(0.01)
    keeper.stop()
    await asyncio.sleep(0.05)
    assert not task.done() and not keeper.idle.is_set()  # the pass goes on
    gate.set()
    await asyncio.wait_for(task, 1)  # then it returns at once, not after the 60 s interval
    assert ticks == [0] and keeper.idle.is_set()

    # stopped while it waits for its next pass: it returns at once too
    keeper, task = started_keeper()
    while len(ticks) < 2:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    keeper.stop()
    await asyncio.wait_for(task, 1)
    assert ticks == [0, 1]
