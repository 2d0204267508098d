"""The benchmark's pod, on a real local apiserver, with the harness as its kubelet.

The sidecar needs an apiserver to start (issuer discovery, JWKS, the
AgentPolicies naming its account and the Secrets they reference), so the
harness starts a ``LocalCluster`` and creates what a team and the operator
would: a namespace, a ServiceAccount, a Secret with the (fake) key, an
AgentPolicy with two upstreams on loopback, a Role that lets the account read
that Secret by name and the policies, and a Pod that stays Pending. Then
``localcluster.podplayer`` plays the kubelet: it mints the sidecar's API
token and the agent's pod-bound token with TokenRequest and starts
``sidekey proxy`` (pinned to its core) with the downward API resolved.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import procstats, shipped
from sidekey.core import contract
from sidekey.localcluster import podplayer
from sidekey.localcluster.cluster import LocalCluster
from sidekey.localcluster.processes import Processes

ROOT = Path(__file__).resolve().parent.parent
#: The image's entry point (``/opt/sidekey/bin/sidekey`` in the image).
IMAGE_LAUNCHER = ROOT / "localcluster" / "images" / "sidekey"
SERVICE_ACCOUNT = "agent"
POD = "agent-0"
SECRET = "bench-key"
FAKE_POD_IP = "10.244.0.17"
#: The knob a sidecar may offer to turn its token cache off; without it the
#: harness starts the sidecar through bench.launch, which patches the cache out.
TOKEN_CACHE_ENV = "SIDEKEY_TOKEN_CACHE"


@dataclass
class Pod:
    identity: podplayer.PodIdentity
    key: str  # the upstream key the sidecar attaches (fake, made up here)
    agent_token: str
    workdir: Path

    @property
    def namespace(self) -> str:
        return self.identity.namespace


def _apply(cluster: LocalCluster, *manifests: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(manifests)))


#: The LLM arm's models: an exact name and a pattern, as a real allow-list would hold.
LLM_MODELS = ["bench", "bench-sse", "gpt-4.1*"]
#: Its budget: per pod, far more than any run spends, so it never runs out.
LLM_BUDGET = {"tokens": 10**12, "window": "24h", "scope": "pod"}


def create_pod(cluster: LocalCluster, workdir: Path, *, upstream_port: int, sse_port: int,
               llm: bool = False) -> Pod:
    """A namespace with the bench's policy and a Pending pod; ``llm`` adds ``api: openai``, a model
    allow-list and a token budget to both upstreams (the sidecar then reads every body and meters
    every SSE event)."""
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.wait_established(f"{contract.PLURAL}.{contract.GROUP}")
    ns = f"bench-{secrets.token_hex(4)}"
    key = f"sk-bench-FAKE-{secrets.token_hex(16)}"

    def upstream(name: str, port: int) -> dict[str, Any]:
        # plain http on loopback: TLS would hide the proxy's own cost (said in the results)
        return {"name": name, "url": f"http://127.0.0.1:{port}", "insecure": True,
                "auth": {"type": "bearer", "secretRef": {"name": SECRET, "key": "api-key"}},
                "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}],
                **({"api": "openai", "models": LLM_MODELS, "budgets": [LLM_BUDGET]} if llm else {})}

    _apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    _apply(
        cluster,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "namespace": ns}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": ns},
         "stringData": {"api-key": key}},
        {"apiVersion": contract.API_VERSION, "kind": contract.KIND,
         "metadata": {"name": "bench", "namespace": ns},
         "spec": {"subjects": {"serviceAccounts": [SERVICE_ACCOUNT]},
                  "upstreams": [upstream("bench", upstream_port), upstream("sse", sse_port)]}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "sidekey-bench", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET],
                    "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [contract.GROUP], "resources": [contract.PLURAL],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "sidekey-bench", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidekey-bench"},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": ns}]},
    )
    out = cluster.kubectl("apply", "-o", "json", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": ns},
        "spec": {"serviceAccountName": SERVICE_ACCOUNT,
                 "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}))
    identity = podplayer.PodIdentity.of(json.loads(out), FAKE_POD_IP)
    agent_token = podplayer.mint_agent_token(cluster, identity, seconds=3600)
    return Pod(identity=identity, key=key, agent_token=agent_token, workdir=workdir)


def cache_knob_exists() -> bool:
    """Whether the proxy reads ``SIDEKEY_TOKEN_CACHE`` (grep, not import: importing is slow)."""
    return any(TOKEN_CACHE_ENV in p.read_text() for p in
               [*(ROOT / "proxy").glob("*.py"), ROOT / "core" / "tokens.py", ROOT / "core" / "contract.py"])


def patches_for(token_cache: bool, extra: frozenset[str] = frozenset()) -> set[str]:
    """The bench.launch patches a sidecar needs (none: the real console script runs)."""
    patches = set(extra)
    if not token_cache and not cache_knob_exists():
        patches.add("nocache")
    return patches


def start_sidecar(cluster: LocalCluster, pod: Pod, procs: Processes, name: str, *,
                  core: int | None, token_cache: bool = True, timeout: float = 30.0,
                  patches: frozenset[str] = frozenset(),
                  env_extra: dict[str, str] | None = None,
                  image: shipped.Shipped | None = None) -> podplayer.RunningSidecar:
    """The sidecar, pinned to ``core``, through bench.launch when a patch is needed.

    With ``image``, the image's venv on the image's interpreter runs it (what a pod
    runs; the benchmark's arms); without, this venv's interpreter and tree."""
    env = {"PATH": os.environ.get("PATH", ""), **(env_extra or {})}
    # the image's own entry point, the way the image runs it (python -IBu: isolated, unbuffered)
    python = str(image.python) if image is not None else sys.executable
    command: list[str] = image.sidecar_command() if image is not None else [
        python, "-IBu", str(IMAGE_LAUNCHER), "proxy"]
    if not token_cache:
        env[TOKEN_CACHE_ENV] = "0"
    needed = patches_for(token_cache, patches)
    if needed:
        env["BENCH_PATCHES"] = ",".join(sorted(needed))
        env["PYTHONPATH"] = str(ROOT)
        command = [python, "-Bu", "-m", "bench.launch", "proxy"]  # -I would drop PYTHONPATH
    return podplayer.start_sidecar(cluster, pod.identity, procs, pod.workdir / name, name=name, env=env,
                                   command=command, prefix=procstats.pin_prefix(core), timeout=timeout,
                                   poll=0.005)


def start_cluster(workdir: Path) -> LocalCluster:
    cluster = LocalCluster(workdir=workdir / "cluster")
    cluster.start()
    return cluster
