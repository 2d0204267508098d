"""serviceAccount budgets shared by many sidecars, on the real apiserver (Leases kept by the operator).

Each "sidecar" here is the sidecar's own ``llmslices.SharedAccount`` with an
API client authenticated as the subject service account (a TokenRequest
token), so the Role the operator grants is exercised too. The operator runs
as a process, as in production: it creates the ledger Leases, reclaims the
slices of silent holders and writes ``status.budgets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidekey.core import apiconfig, kubeapi, llmledger, llmpolicy
from sidekey.proxy import llmbudgets, llmrequests, llmslices
from tests.operator.support import service_account
from tests.support.kubectl import apply, get, wait_for

pytestmark = pytest.mark.e2e


def budget_policy(namespace: str, tokens: int, *, name: str = "budgeted") -> dict[str, Any]:
    return {
        "apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
            "name": "openai", "url": "https://api.openai.com/v1",
            "auth": {"type": "bearer", "secretRef": {"name": "openai", "key": "api-key"}},
            "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
            "api": "openai",
            "budgets": [{"tokens": tokens, "window": "24h", "scope": "serviceAccount"}],
        }]},
    }


BUDGET_TOKENS = 20_000


@pytest.fixture
def ledger(cluster: Any, operator: Any, namespace: str) -> Iterator[dict[str, Any]]:
    """A policy with one serviceAccount budget, its Lease created by the operator."""
    apply(cluster, service_account("agent", namespace), budget_policy(namespace, BUDGET_TOKENS))
    lease_name = llmledger.lease_name("budgeted", "openai", 0, "agent")
    wait_for("the operator to create the ledger Lease",
             lambda: get(cluster, "lease", lease_name, namespace), timeout=30)
    wait_for("the Role to grant the Lease",
             lambda: "leases" in json.dumps(get(cluster, "role", "sidekey-policy-budgeted", namespace)), timeout=30)
    yield {"namespace": namespace, "lease": lease_name}


def holder_timeout(cluster: Any, namespace: str, lease: str, seconds: int) -> None:
    cluster.kubectl("patch", "lease", lease, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"leaseDurationSeconds": seconds}}))


def read_ledger(cluster: Any, namespace: str, lease: str) -> llmledger.Ledger:
    obj = get(cluster, "lease", lease, namespace)
    assert obj is not None
    return llmledger.loads(obj["metadata"]["annotations"][llmledger.ANNOTATION])


@contextlib.asynccontextmanager
async def agent_api(cluster: Any, namespace: str, tmp: Path, server: str | None = None
                    ) -> AsyncIterator[kubeapi.ApiClient]:
    token_file = tmp / f"token-{uuid.uuid4().hex[:6]}"
    token_file.write_text(cluster.token(namespace, "agent", audience=cluster.issuer, seconds=3600))
    config = apiconfig.ApiConfig(server=server or cluster.url, ca_file=cluster.ca_file, token_file=token_file)
    async with kubeapi.ApiClient(config) as api:
        yield api


def sidecar(api: kubeapi.ApiClient, ledger: dict[str, Any], holder: str | None = None) -> llmslices.SharedAccount:
    budget = llmpolicy.Budget(BUDGET_TOKENS, "24h", 86400, "serviceAccount")
    uid = holder or str(uuid.uuid4())
    return llmslices.SharedAccount(budget, api=api, namespace=ledger["namespace"], lease=ledger["lease"],
                                   holder=uid, pod=f"agent-{uid[:6]}")


def request(tokens: int) -> llmrequests.Call:
    """A chat request whose estimate is about ``tokens`` (the prompt's bytes plus max_tokens)."""
    call = llmrequests.read("openai", "chat", b'{"model":"m","messages":[],"max_tokens":1}')
    call.max_output = max(1, tokens - call.prompt_estimate)
    return call


async def spend_one(account: llmslices.SharedAccount, tokens: int, rng: random.Random) -> int | None:
    """Reserve, 'call the upstream', settle to a random actual use; the use, or None if refused."""
    call = request(tokens)
    await account.ensure(call.estimate)
    try:
        reservation = llmbudgets.reserve([account], call, cap=True, upstream="openai", policy="budgeted")
    except llmrequests.LlmRefusal:
        return None
    account.refill_soon()
    await asyncio.sleep(rng.uniform(0, 0.01))
    actual = rng.randint(1, call.estimate)
    reservation.settle(actual)
    return actual


async def test_concurrent_sidecars_never_get_more_than_the_budget_in_total(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    n = 8
    rng = random.Random(16)
    spent = [0] * n
    async with agent_api(cluster, ledger["namespace"], tmp_path) as api:
        accounts = [sidecar(api, ledger) for _ in range(n)]

        async def run(i: int) -> None:
            refused = 0
            while refused < 3:
                used = await spend_one(accounts[i], rng.randint(50, 600), rng)
                if used is None:
                    refused += 1
                else:
                    spent[i] += used
                    refused = 0

        await asyncio.gather(*(run(i) for i in range(n)))
        for a in accounts:
            await a.heartbeat()
        writes = [a.writes for a in accounts]
    led = read_ledger(cluster, ledger["namespace"], ledger["lease"])
    assert led.granted <= BUDGET_TOKENS
    assert sum(spent) <= BUDGET_TOKENS, f"overrun: {sum(spent) - BUDGET_TOKENS}"
    assert led.spent == sum(spent)  # every sidecar's last report is its own count
    # the pool ran dry: what is left ungranted is less than the largest request
    assert led.available < 600
    print(f"\n{n} sidecars spent {sum(spent)} of {BUDGET_TOKENS} (granted {led.granted}); "
          f"writes per sidecar {writes}, tokens per write {sum(spent) / sum(writes):.0f}")


async def test_a_dead_sidecar_loses_only_its_unspent_slice_and_it_comes_back_after_the_timeout(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    ns, lease = ledger["namespace"], ledger["lease"]
    holder_timeout(cluster, ns, lease, 3)
    rng = random.Random(1)
    async with agent_api(cluster, ns, tmp_path) as api:
        dying = sidecar(api, ledger)
        assert await spend_one(dying, 300, rng) is not None
        await dying.heartbeat()
        used, held = dying.used, dying.limit
        # ... and it dies: no release, no more heartbeats
        led = read_ledger(cluster, ns, lease)
        assert led.available == BUDGET_TOKENS - held
        assert led.holding(dying.holder) == held - used
        # the operator reclaims it once it is silent for the Lease's duration (3 s, checked every 5 s)
        back = wait_for("the operator to reclaim the dead holder's slice",
                        lambda: dying.holder not in read_ledger(cluster, ns, lease).holders, timeout=20)
        assert back
        led = read_ledger(cluster, ns, lease)
        assert led.retired == used  # what it used stays spent
        assert led.available == BUDGET_TOKENS - used  # the unspent part came back
        other = sidecar(api, ledger)
        await other.ensure(BUDGET_TOKENS - used)
        assert other.left() == BUDGET_TOKENS - used


async def test_a_restarted_sidecar_resumes_with_what_it_held_not_a_fresh_budget(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    ns, lease = ledger["namespace"], ledger["lease"]
    rng = random.Random(2)
    pod_uid = str(uuid.uuid4())
    async with agent_api(cluster, ns, tmp_path) as api:
        first = sidecar(api, ledger, holder=pod_uid)
        while first.used < 700:
            assert await spend_one(first, 200, rng) is not None
        await first.heartbeat()
        granted_before = read_ledger(cluster, ns, lease).granted
        used, held = first.used, first.limit
    # the sidecar container restarts in the same pod: a new process, the same pod uid
    async with agent_api(cluster, ns, tmp_path) as api:
        again = sidecar(api, ledger, holder=pod_uid)
        await again.ensure(1)
        assert again.spent == used
        assert again.left() == held - used
        assert read_ledger(cluster, ns, lease).granted == granted_before


class CuttableTunnel:
    """A TCP forwarder to the apiserver that the test can cut: 'the apiserver is down'."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers += [w, uw]
            await asyncio.gather(pipe(r, uw), pipe(ur, w))

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()


async def test_with_the_apiserver_down_a_sidecar_spends_only_what_it_holds(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    ns, lease = ledger["namespace"], ledger["lease"]
    holder_timeout(cluster, ns, lease, 6)
    rng = random.Random(3)
    tunnel = CuttableTunnel(int(cluster.url.rsplit(":", 1)[1]))
    port = await tunnel.start()
    async with agent_api(cluster, ns, tmp_path, server=f"https://127.0.0.1:{port}") as api:
        cut_off = sidecar(api, ledger)
        await cut_off.ensure(100)
        held = cut_off.limit
        assert held == llmledger.slice_size(BUDGET_TOKENS)
        await tunnel.cut()
        spent = 0
        for _ in range(200):
            used = await spend_one(cut_off, 150, rng)
            if used is None:
                break
            spent += used
        assert spent <= held
        assert cut_off.limit == held  # no grant was made up while cut off
        with pytest.raises(llmrequests.LlmRefusal) as caught:
            llmbudgets.reserve([cut_off], request(held), cap=True, upstream="openai", policy="budgeted")
        assert "holds only what the ledger granted before" in caught.value.message
        # and the slice stops being spendable before the operator may reclaim it
        await asyncio.sleep(6 * (1 - llmledger.SAFETY_MARGIN_FRACTION) + 0.2)
        assert cut_off.left() <= 0
    led = read_ledger(cluster, ns, lease)
    assert led.granted <= BUDGET_TOKENS


def test_the_policy_status_shows_the_spend_per_budget_and_kubectl_a_spend_column(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    ns = ledger["namespace"]

    async def spend() -> None:
        async with agent_api(cluster, ns, tmp_path) as api:
            a = sidecar(api, ledger)
            rng = random.Random(4)
            while a.used < 1500:
                assert await spend_one(a, 400, rng) is not None
            await a.heartbeat()

    asyncio.run(spend())

    def reported() -> Any:
        status = (get(cluster, "agentpolicy", "budgeted", ns) or {}).get("status") or {}
        budgets = status.get("budgets") or []
        return budgets if budgets and budgets[0]["spent"] >= 1500 else None

    [entry] = wait_for("status.budgets to show the spend", reported, timeout=40)
    assert entry["tokens"] == BUDGET_TOKENS and entry["window"] == "24h"
    assert entry["serviceAccount"] == "agent" and entry["upstream"] == "openai"
    assert entry["granted"] <= BUDGET_TOKENS
    table = cluster.kubectl("get", "agentpolicies", "-n", ns)
    assert "SPEND" in table.splitlines()[0]
    assert f"/{BUDGET_TOKENS} per 24h (openai/agent)" in table


async def test_sidecars_that_die_overrun_the_budget_by_at_most_their_unreported_spend(
        cluster: Any, ledger: dict[str, Any], tmp_path: Path) -> None:
    """The stated bound (docs/llm.md): spent <= tokens + D x S for D sidecars dying in the window."""
    ns, lease = ledger["namespace"], ledger["lease"]
    holder_timeout(cluster, ns, lease, 3)
    rng = random.Random(5)
    s = llmledger.slice_size(BUDGET_TOKENS)
    async with agent_api(cluster, ns, tmp_path) as api:
        first = [sidecar(api, ledger) for _ in range(4)]
        for _ in range(3):
            await asyncio.gather(*(spend_one(a, rng.randint(100, 400), rng) for a in first))
        for a in first:
            await a.heartbeat()
        dying, living = first[:2], first[2:]
        unreported = 0
        for a in dying:  # spend what they hold, report nothing, and die
            while a.left() > 50:
                call = request(min(a.left(), 300))
                llmbudgets.reserve([a], call, cap=True, upstream="openai", policy="budgeted").settle(call.estimate)
                unreported += call.estimate
        assert 0 < unreported <= 2 * s
        fresh = [sidecar(api, ledger) for _ in range(2)]

        async def run(a: llmslices.SharedAccount) -> None:
            idle_since = asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - idle_since < 12:  # past the reclaim (3 s + a 5 s tick)
                if await spend_one(a, rng.randint(50, 400), rng) is None:
                    await asyncio.sleep(0.2)
                else:
                    idle_since = asyncio.get_running_loop().time()
            await a.heartbeat()

        await asyncio.gather(*(run(a) for a in living + fresh))
    spent = sum(a.spent for a in first + fresh)
    overrun = spent - BUDGET_TOKENS
    led = read_ledger(cluster, ns, lease)
    assert not set(led.holders) & {a.holder for a in dying}  # both were reclaimed
    assert led.granted <= BUDGET_TOKENS
    assert overrun <= unreported <= 2 * s, f"overrun {overrun} above the bound"
    print(f"\n2 of 6 sidecars died with {unreported} tokens unreported; spent {spent} of {BUDGET_TOKENS}: "
          f"overrun {max(0, overrun)} (bound D x S = {2 * s})")
