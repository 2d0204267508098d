"""Two real sidecars (``sidekey proxy`` processes) share one serviceAccount budget on the real apiserver.

The operator runs as a process and keeps the ledger Lease; the test plays
the kubelet (pods created, their bound tokens minted, the sidecars started
with the env the webhook sets, ``localcluster.podplayer``); the agents are
the real ``openai`` SDK, concurrently, until the budget is spent.
"""

from __future__ import annotations

import base64
import concurrent.futures
from pathlib import Path
from typing import Any

import openai
import pytest

from sidekey.core import llmledger
from sidekey.localcluster import podplayer
from sidekey.localcluster.processes import Processes
from sidekey.localcluster.upstreams import MockLLM
from tests.support.kubectl import apply, get, wait_for

pytestmark = pytest.mark.e2e

KEY = "sk-shared-budget-0123456789abcdef"
TOKENS = 3000


def manifests(namespace: str, mock: MockLLM) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent", "namespace": namespace}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm", "namespace": namespace},
         "data": {"openai": base64.b64encode(KEY.encode()).decode()}},
        {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
         "metadata": {"name": "shared", "namespace": namespace},
         "spec": {"subjects": {"serviceAccounts": ["agent"]}, "upstreams": [{
             "name": "openai", "url": f"https://127.0.0.1:{mock.port}/v1", "caBundle": mock.ca_pem,
             "auth": {"type": "bearer", "secretRef": {"name": "llm", "key": "openai"}},
             "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
             "api": "openai", "models": ["mock-model"],
             "budgets": [{"tokens": TOKENS, "window": "24h", "scope": "serviceAccount"}],
         }]}},
    ]


def pod(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"serviceAccountName": "agent", "automountServiceAccountToken": False,
                     "initContainers": [{"name": "sidekey-proxy", "image": "ghcr.io/sidekey/sidekey:0.1.0",
                                         "restartPolicy": "Always", "args": ["proxy"]}],
                     "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}


def test_two_sidecars_spend_one_service_account_budget_and_release_it_on_stop(
        cluster: Any, operator: Any, namespace: str, tmp_path: Path) -> None:
    mock = MockLLM(keys={"openai": KEY}, reply=" ".join(["w"] * 100), word_gap=0.0)
    mock.start()
    try:
        apply(cluster, *manifests(namespace, mock))
        lease = llmledger.lease_name("shared", "openai", 0, "agent")
        wait_for("the ledger Lease", lambda: get(cluster, "lease", lease, namespace), timeout=30)
        with Processes(tmp_path / "procs") as procs:
            agents = []
            for name in ("agent-a", "agent-b"):
                apply(cluster, pod(namespace, name))
                stored = get(cluster, "pod", name, namespace)
                assert stored is not None
                identity = podplayer.PodIdentity.of(stored)
                wait_for("the Role to grant the Lease",
                         lambda: "leases" in str(get(cluster, "role", "sidekey-policy-shared", namespace)), timeout=30)
                sidecar = podplayer.start_sidecar(cluster, identity, procs, tmp_path / name, name=name)
                token = podplayer.mint_agent_token(cluster, identity)
                agents.append((identity, sidecar, openai.OpenAI(base_url=f"{sidecar.url}/openai",
                                                              api_key=token, max_retries=0)))

            def spend(client: openai.OpenAI) -> tuple[int, int]:
                used = refused = 0
                while refused < 2:
                    try:
                        r = client.chat.completions.create(
                            model="mock-model", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
                    except openai.RateLimitError as exc:
                        assert "per serviceAccount" in exc.message
                        refused += 1
                        continue
                    assert r.usage is not None
                    used += r.usage.total_tokens
                return used, refused

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(spend, [a[2] for a in agents for _ in range(2)]))
            spent = sum(u for u, _ in results)
            assert spent <= TOKENS
            assert spent > TOKENS // 2  # most of the budget went to real calls
            for _, sidecar, _ in agents:
                sidecar.process.stop()  # SIGTERM: the drain releases the unspent slices
        led = llmledger.loads(get(cluster, "lease", lease, namespace)["metadata"]["annotations"][llmledger.ANNOTATION])
        assert not led.holders  # both handed their slices back on stop
        assert led.retired == spent  # and what they spent stays spent
        assert led.granted <= TOKENS
    finally:
        mock.stop()
