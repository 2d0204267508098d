"""Playing the kubelet: what a node would do with an injected pod.

There is no kubelet here, so the demo does its part for the two things that
matter to sidekey: it mints each projected service-account token with
TokenRequest (bound to the pod, with the audience and lifetime the volume
asks for) and writes it where the pod would see it, and it starts the sidecar
with the env the spec gives it (the downward API resolved by hand).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidekey.core import contract
from sidekey.localcluster.cluster import LocalCluster, free_port
from sidekey.localcluster.processes import Process, Processes


def agent_pod(name: str, namespace: str, service_account: str, proxy_port: int | None) -> dict[str, Any]:
    """An agent pod as a team would write it: an annotation, nothing else about sidekey."""
    annotations = {contract.ANNOTATION_INJECT: "true"}
    if proxy_port is not None:
        # Real pods each have their own loopback; here sidecars share one, so each gets a port.
        annotations[contract.ANNOTATION_PORT] = str(proxy_port)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "agent", "image": "python:3.12-slim",
                                 "command": ["python", "-m", "my_agent"]}]},
    }


@dataclass
class RunningSidecar:
    process: Process
    port: int
    health_port: int
    agent_token_file: Path


def _projected_token(pod: dict[str, Any], volume: str) -> dict[str, Any]:
    for v in pod["spec"]["volumes"]:
        if v["name"] == volume:
            for src in v["projected"]["sources"]:
                if "serviceAccountToken" in src:
                    token: dict[str, Any] = src["serviceAccountToken"]
                    return token
    raise LookupError(f"pod has no projected serviceAccountToken volume {volume!r}")


def _field(pod: dict[str, Any], path: str, pod_ip: str) -> str:
    values = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "status.podIP": pod_ip,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
    }
    return str(values[path])


def start_sidecar(cluster: LocalCluster, pod: dict[str, Any], procs: Processes, directory: Path,
                  *, pod_ip: str, name: str) -> RunningSidecar:
    meta, spec = pod["metadata"], pod["spec"]
    sa = spec.get("serviceAccountName", "default")
    sidecar = next(c for c in spec["initContainers"] if c["name"] == contract.SIDECAR_CONTAINER_NAME)

    api_dir = directory / "api"
    api_dir.mkdir(parents=True, exist_ok=True)
    api = _projected_token(pod, contract.API_TOKEN_VOLUME)
    (api_dir / contract.API_TOKEN_FILENAME).write_text(cluster.token(
        meta["namespace"], sa, audience=cluster.issuer, pod_name=meta["name"], pod_uid=meta["uid"],
        seconds=int(api["expirationSeconds"])))
    (api_dir / contract.API_CA_FILENAME).write_bytes(cluster.ca_file.read_bytes())
    (api_dir / contract.API_NAMESPACE_FILENAME).write_text(meta["namespace"])

    agent = _projected_token(pod, contract.AGENT_TOKEN_VOLUME)
    token_file = directory / "agent-token"
    token_file.write_text(cluster.token(
        meta["namespace"], sa, audience=agent["audience"], pod_name=meta["name"], pod_uid=meta["uid"],
        seconds=int(agent["expirationSeconds"])))

    env: dict[str, str] = {}
    for e in sidecar.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = _field(pod, e["valueFrom"]["fieldRef"]["fieldPath"], pod_ip)
    health_port = free_port()  # the pod's own loopback would make the spec's port unique
    env[contract.ENV_HEALTH_PORT] = str(health_port)
    env[contract.ENV_API_SERVER] = cluster.url
    env[contract.ENV_API_TOKEN_DIR] = str(api_dir)
    env["PATH"] = os.environ.get("PATH", "")
    args = sidecar.get("args", ["proxy"])
    proc = procs.start(name, [sys.executable, "-m", "sidekey", *args], env=env)
    port = int(env[contract.ENV_PROXY_PORT])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return RunningSidecar(proc, port, health_port, token_file)
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"sidecar {name} did not become ready; log:\n{proc.tail()}")


def agent_env(pod: dict[str, Any], sidecar: RunningSidecar) -> dict[str, str]:
    """The agent container's env, with the token path mapped to where the demo wrote it."""
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", []) if "value" in e}
    env[contract.ENV_TOKEN_FILE] = str(sidecar.agent_token_file)
    return env
