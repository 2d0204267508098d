"""The benchmark's pod, on a real local apiserver, with the harness as its kubelet.

The sidecar needs an apiserver to start (issuer discovery, JWKS, the
AgentPolicies naming its account and the Secrets they reference), so the
harness starts a ``LocalCluster`` and creates what a team and the operator
would: a namespace, a ServiceAccount, a Secret with the (fake) key, an
AgentPolicy with two upstreams on loopback, a Role that lets the account read
that Secret by name and the policies, and a Pod that stays Pending. Then it
plays the kubelet: mints the sidecar's API token and the agent's pod-bound
token with TokenRequest, writes the API token directory and starts
``sidekey proxy`` with the downward-API env resolved by hand.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import procstats
from sidekey.core import contract
from sidekey.localcluster.cluster import LocalCluster, free_port
from sidekey.localcluster.processes import Process, Processes

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ACCOUNT = "agent"
POD = "agent-0"
SECRET = "bench-key"
FAKE_POD_IP = "10.244.0.17"
#: The knob a sidecar may offer to turn its token cache off; without it the
#: harness starts the sidecar through bench.launch, which patches the cache out.
TOKEN_CACHE_ENV = "SIDEKEY_TOKEN_CACHE"


@dataclass
class Pod:
    namespace: str
    uid: str
    key: str  # the upstream key the sidecar attaches (fake, made up here)
    agent_token: str
    api_dir: Path


@dataclass
class Sidecar:
    process: Process
    port: int
    health_port: int
    ready_seconds: float

    @property
    def pid(self) -> int:
        return int(self.process.popen.pid)


def _apply(cluster: LocalCluster, *manifests: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(manifests)))


def create_pod(cluster: LocalCluster, workdir: Path, *, upstream_port: int, sse_port: int) -> Pod:
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    f"crd/{contract.PLURAL}.{contract.GROUP}")
    ns = f"bench-{secrets.token_hex(4)}"
    key = f"sk-bench-FAKE-{secrets.token_hex(16)}"

    def upstream(name: str, port: int) -> dict[str, Any]:
        # plain http on loopback: TLS would hide the proxy's own cost (said in the results)
        return {"name": name, "url": f"http://127.0.0.1:{port}", "insecure": True,
                "auth": {"type": "bearer", "secretRef": {"name": SECRET, "key": "api-key"}},
                "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}]}

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
    uid = json.loads(out)["metadata"]["uid"]
    api_dir = workdir / "api"
    api_dir.mkdir(parents=True, exist_ok=True)
    (api_dir / contract.API_TOKEN_FILENAME).write_text(cluster.token(
        ns, SERVICE_ACCOUNT, audience=cluster.issuer, pod_name=POD, pod_uid=uid,
        seconds=contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS))
    (api_dir / contract.API_CA_FILENAME).write_bytes(cluster.ca_file.read_bytes())
    (api_dir / contract.API_NAMESPACE_FILENAME).write_text(ns)
    agent_token = cluster.token(ns, SERVICE_ACCOUNT, audience=contract.DEFAULT_AUDIENCE,
                                pod_name=POD, pod_uid=uid, seconds=3600)
    return Pod(namespace=ns, uid=uid, key=key, agent_token=agent_token, api_dir=api_dir)


def _sidekey_binary() -> str:
    beside = Path(sys.executable).parent / "sidekey"
    found = str(beside) if beside.exists() else shutil.which("sidekey")
    if not found:
        raise RuntimeError("the sidekey console script is not installed (pip install -e .)")
    return found


def cache_knob_exists() -> bool:
    """Whether the proxy reads ``SIDEKEY_TOKEN_CACHE`` (grep, not import: importing is slow)."""
    return any(TOKEN_CACHE_ENV in p.read_text() for p in
               [*(ROOT / "proxy").glob("*.py"), ROOT / "core" / "tokens.py", ROOT / "core" / "contract.py"])


def jwks_accept_missing() -> bool:
    """Whether the API client still asks for JSON only (the apiserver's JWKS answers 406 to it)."""
    return "jwk-set" not in (ROOT / "core" / "kubeapi.py").read_text()


def patches_for(token_cache: bool, extra: frozenset[str] = frozenset()) -> set[str]:
    """The bench.launch patches a sidecar needs (none: the real console script runs)."""
    patches = set(extra)
    if not token_cache and not cache_knob_exists():
        patches.add("nocache")
    if jwks_accept_missing():
        patches.add("jwks-accept")
    return patches


def _ready(health_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_sidecar(cluster: LocalCluster, pod: Pod, procs: Processes, name: str, *,
                  core: int | None, token_cache: bool = True, timeout: float = 30.0,
                  patches: frozenset[str] = frozenset(), env_extra: dict[str, str] | None = None) -> Sidecar:
    port, health_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        contract.ENV_POD_NAME: POD, contract.ENV_POD_NAMESPACE: pod.namespace,
        contract.ENV_POD_UID: pod.uid, contract.ENV_POD_IP: FAKE_POD_IP,
        contract.ENV_SERVICE_ACCOUNT: SERVICE_ACCOUNT,
        contract.ENV_PROXY_PORT: str(port), contract.ENV_HEALTH_PORT: str(health_port),
        contract.ENV_HEALTH_ADDRESS: "127.0.0.1",
        contract.ENV_API_SERVER: cluster.url, contract.ENV_API_TOKEN_DIR: str(pod.api_dir),
    }
    env.update(env_extra or {})
    argv = [_sidekey_binary(), "proxy"]
    if not token_cache:
        env[TOKEN_CACHE_ENV] = "0"
    needed = patches_for(token_cache, patches)
    if needed:
        env["BENCH_PATCHES"] = ",".join(sorted(needed))
        env["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, "-m", "bench.launch", "proxy"]
    started = time.perf_counter()
    proc = procs.start(name, [*procstats.pin_prefix(core), *argv], env=env)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        proc.check_alive()
        if _ready(health_port):
            return Sidecar(proc, port, health_port, time.perf_counter() - started)
        time.sleep(0.005)
    raise TimeoutError(f"sidecar {name} was not ready within {timeout} s; log:\n{proc.tail()}")


def start_cluster(workdir: Path) -> LocalCluster:
    cluster = LocalCluster(workdir=workdir / "cluster")
    cluster.start()
    return cluster
