"""Helpers for the operator tests: run ``sidekey operator`` as a subprocess, poll the cluster."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_namespace

SIDECAR_IMAGE = "ghcr.io/sidekey/sidekey:test-current"
#: An image on the chart's sidecar.imageAllowList (what sidekey.io/image picks from).
ALLOWED_SIDECAR_IMAGE = "mirror.example/sidekey:test-current"
#: A namespace in the chart's webhook.excludedNamespaces; unique per test run.
EXCLUDED_NAMESPACE = f"sk-excluded-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningOperator:
    process: subprocess.Popen[bytes]
    log: Path
    namespace: str
    health_port: int
    metrics_port: int
    args: list[str]

    def get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> str:
        return self.get(self.metrics_port, "/metrics")[1]

    def metric(self, name: str) -> float:
        """One sample's value; ``name`` as exposed, labels included (``x{a="b"}``)."""
        for line in self.metrics().splitlines():
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(cluster: Any, workdir: Path, *extra: str, namespace: str | None = None,
                   kubeconfig: Path | None = None, wait_ready: bool = True) -> RunningOperator:
    ns = namespace or make_namespace(cluster, "sk-op")
    health, metrics_port = free_port(), free_port()
    args = [sys.executable, "-m", "sidekey", "operator",
            "--kubeconfig", str(kubeconfig or cluster.kubeconfig),
            "--namespace", ns, "--health-port", str(health), "--metrics-port", str(metrics_port),
            "--listen-address", "127.0.0.1", "--webhook-address", "127.0.0.1", *extra]
    log = workdir / f"operator-{ns}-{health}.log"
    fh = log.open("wb")
    proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    fh.close()
    op = RunningOperator(proc, log, ns, health, metrics_port, args)
    if wait_ready:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the operator exited with {proc.returncode}:\n{op.output()[-4000:]}")
            try:
                if op.get(health, "/readyz")[0] == 200:
                    return op
            except OSError:
                pass
            time.sleep(0.1)
        op.stop()
        pytest.fail(f"the operator was not ready within 60s:\n{op.output()[-4000:]}")
    return op


# --- small cluster helpers -----------------------------------------------------------


def apply(cluster: Any, *manifests: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))


def get(cluster: Any, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = cluster.kubectl(*args)
    return json.loads(out) if out.strip() else None


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1
             ) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def condition(policy: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((policy or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def service_account(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}}


def policy(name: str, namespace: str, *, secret_name: str = "openai", key: str = "api-key",
           upstream: str = "openai", env: str | None = "OPENAI_BASE_URL",
           service_accounts: tuple[str, ...] = ("agent",), url: str = "https://api.openai.com/v1"
           ) -> dict[str, Any]:
    up: dict[str, Any] = {
        "name": upstream, "url": url,
        "auth": {"type": "bearer", "secretRef": {"name": secret_name, "key": key}},
        "allow": [{"methods": ["POST"], "paths": ["/chat/completions"]}],
    }
    if env:
        up["env"] = [{"name": env}]
    return {"apiVersion": "sidekey.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"subjects": {"serviceAccounts": list(service_accounts)}, "upstreams": [up]}}
