"""Playing the kubelet for one pod on a control plane that has no node.

The local control plane schedules nothing, so whoever needs a running
sidecar (the demo, the benchmarks, the e2e and attack tests) does the two
things of the kubelet's part that matter to sidekey, here and only here:

- it mints each projected service-account token with TokenRequest, bound to
  the pod, and writes it where the container would see it (the sidecar's API
  token directory: token, CA, namespace);
- it starts ``sidekey proxy`` with the env the injected spec gives it, the
  downward API resolved by hand, and waits until ``/readyz`` answers 200.

Two things differ from a node, on purpose: every sidecar shares the host's
loopback, so each gets its own free health port (and proxy port, unless the
spec names one); and the sidecar reaches the apiserver at its loopback
address, which a pod would get from ``KUBERNETES_SERVICE_HOST``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidekey.core import contract
from sidekey.localcluster.cluster import LocalCluster, free_port
from sidekey.localcluster.processes import Process, Processes

#: ``sidekey proxy`` from the interpreter running this (its venv has sidekey installed).
PROXY_COMMAND = (sys.executable, "-m", "sidekey", "proxy")
#: The pod IP a sidecar is told it has when the caller does not care (the downward API's status.podIP).
POD_IP = "10.244.0.17"


@dataclass(frozen=True)
class PodIdentity:
    """What the kubelet knows of a pod that the sidecar's env and tokens carry."""

    namespace: str
    name: str
    uid: str
    service_account: str
    ip: str = POD_IP

    @classmethod
    def of(cls, pod: Mapping[str, Any], ip: str = POD_IP) -> PodIdentity:
        """The identity of a pod as the apiserver stored it (it has a uid)."""
        meta = pod["metadata"]
        return cls(meta["namespace"], meta["name"], meta["uid"],
                   pod["spec"].get("serviceAccountName", "default"), ip)

    def downward_api(self) -> dict[str, str]:
        """The env the injected spec fills from ``fieldRef``s, resolved."""
        return {contract.ENV_POD_NAME: self.name, contract.ENV_POD_NAMESPACE: self.namespace,
                contract.ENV_POD_UID: self.uid, contract.ENV_POD_IP: self.ip,
                contract.ENV_SERVICE_ACCOUNT: self.service_account}


def mint_api_token_dir(cluster: LocalCluster, pod: PodIdentity, directory: Path, *,
                       seconds: int = contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS) -> str:
    """Write the sidecar's API token directory (token, CA, namespace); return the token."""
    directory.mkdir(parents=True, exist_ok=True)
    token = cluster.token(pod.namespace, pod.service_account, audience=cluster.issuer,
                          pod_name=pod.name, pod_uid=pod.uid, seconds=seconds)
    (directory / contract.API_TOKEN_FILENAME).write_text(token)
    (directory / contract.API_CA_FILENAME).write_bytes(cluster.ca_file.read_bytes())
    (directory / contract.API_NAMESPACE_FILENAME).write_text(pod.namespace)
    return token


def mint_agent_token(cluster: LocalCluster, pod: PodIdentity, *, audience: str = contract.DEFAULT_AUDIENCE,
                     seconds: int = 600) -> str:
    """The pod-bound token the agent container's projected volume would hold."""
    return cluster.token(pod.namespace, pod.service_account, audience=audience,
                         pod_name=pod.name, pod_uid=pod.uid, seconds=seconds)


def projected_token(pod: Mapping[str, Any], volume: str) -> dict[str, Any]:
    """The ``serviceAccountToken`` source of a projected volume of the spec (audience, lifetime)."""
    for v in pod["spec"].get("volumes", []):
        if v["name"] == volume:
            for src in v.get("projected", {}).get("sources", []):
                if "serviceAccountToken" in src:
                    token: dict[str, Any] = src["serviceAccountToken"]
                    return token
    raise LookupError(f"the pod has no projected serviceAccountToken volume {volume!r}")


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], ip: str) -> dict[str, str]:
    """A container's env as the spec gives it: values, and the downward API resolved."""
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "metadata.uid": pod["metadata"]["uid"], "status.podIP": ip, "status.podIPs": ip,
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default")}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = str(fields[e["valueFrom"]["fieldRef"]["fieldPath"]])
    return env


def sidecar_container(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The injected sidecar (an init container with ``restartPolicy: Always``)."""
    for c in pod["spec"].get("initContainers", []):
        if c["name"] == contract.SIDECAR_CONTAINER_NAME:
            found: dict[str, Any] = c
            return found
    raise LookupError(f"the pod has no {contract.SIDECAR_CONTAINER_NAME!r} init container")


def readyz(health_port: int, timeout: float = 1.0) -> bool:
    """Whether the sidecar's ``/readyz`` answers 200 right now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class RunningSidecar:
    process: Process
    port: int
    health_port: int
    api_token: str
    api_dir: Path
    ready_seconds: float  # from the start of the process to the first 200 from /readyz

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def pid(self) -> int:
        return int(self.process.popen.pid)

    def audit(self) -> list[dict[str, Any]]:
        """The JSON audit lines the sidecar wrote so far (one per request)."""
        lines = []
        for line in self.process.lines():
            if line.startswith("{") and '"request_id"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    lines.append(doc)
        return lines


def start_sidecar(cluster: LocalCluster, pod: PodIdentity, procs: Processes, directory: Path, *,
                  name: str = "sidecar", env: Mapping[str, str] | None = None,
                  command: Sequence[str] = PROXY_COMMAND, prefix: Sequence[str] = (),
                  api_token_seconds: int = contract.SIDECAR_API_TOKEN_EXPIRATION_SECONDS,
                  wait: bool = True, timeout: float = 30.0, poll: float = 0.02) -> RunningSidecar:
    """Start the sidecar of ``pod`` as the kubelet would, and (unless ``wait`` is off) wait until ready.

    ``env`` is the container's env from the spec (``container_env``); without
    it the downward API alone is used, which is what the webhook injects
    apart from defaults. ``prefix`` goes in front of the command (``taskset``,
    ``unshare``). The log is ``procs``' file for ``name``.
    """
    api_dir = directory / "api"
    api_token = mint_api_token_dir(cluster, pod, api_dir, seconds=api_token_seconds)
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            **pod.downward_api(), contract.ENV_PROXY_PORT: str(free_port()),
            contract.ENV_HEALTH_ADDRESS: "127.0.0.1", **(env or {}),
            # what differs from a node: a shared loopback, and the apiserver's loopback address
            contract.ENV_HEALTH_PORT: str(free_port()),
            contract.ENV_API_SERVER: cluster.url, contract.ENV_API_TOKEN_DIR: str(api_dir)}
    started = time.perf_counter()
    proc = procs.start(name, [*prefix, *command], env=full)
    sidecar = RunningSidecar(proc, int(full[contract.ENV_PROXY_PORT]), int(full[contract.ENV_HEALTH_PORT]),
                             api_token, api_dir, ready_seconds=0.0)
    if not wait:
        return sidecar
    deadline = started + timeout
    while time.perf_counter() < deadline:
        proc.check_alive()
        if readyz(sidecar.health_port):
            sidecar.ready_seconds = time.perf_counter() - started
            return sidecar
        time.sleep(poll)
    raise TimeoutError(f"sidecar {name} was not ready within {timeout:.0f} s; log {proc.log}:\n{proc.tail()}")


@dataclass
class PlayedPod:
    """An injected pod as the kubelet would run it: its sidecar, and what its agent container sees."""

    identity: PodIdentity
    sidecar: RunningSidecar
    agent_token_file: Path
    agent_env: dict[str, str]  # the first container's env, the token path mapped to the file written here


def play(cluster: LocalCluster, pod: Mapping[str, Any], procs: Processes, directory: Path, *,
         name: str = "sidecar", ip: str = POD_IP, timeout: float = 30.0) -> PlayedPod:
    """Run a pod the webhook injected, from its stored spec alone.

    The token lifetimes and the agent token's audience come from the spec's
    projected volumes, and the sidecar's env from its container, exactly as
    injected; the agent token file stands for the agent's projected mount.
    """
    identity = PodIdentity.of(pod, ip)
    api = projected_token(pod, contract.API_TOKEN_VOLUME)
    agent = projected_token(pod, contract.AGENT_TOKEN_VOLUME)
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "agent-token"
    token_file.write_text(mint_agent_token(cluster, identity, audience=agent["audience"],
                                           seconds=int(agent["expirationSeconds"])))
    container = sidecar_container(pod)
    env = container_env(pod, container, ip)
    # the image's entry point is the console script; here it is this interpreter's
    command = [*PROXY_COMMAND[:-1], *container.get("command", ["sidekey"])[1:], *container.get("args", [])]
    sidecar = start_sidecar(cluster, identity, procs, directory, name=name, env=env, command=command,
                            api_token_seconds=int(api["expirationSeconds"]), timeout=timeout)
    agent_env = container_env(pod, pod["spec"]["containers"][0], ip)
    agent_env[contract.ENV_TOKEN_FILE] = str(token_file)
    return PlayedPod(identity, sidecar, token_file, agent_env)
