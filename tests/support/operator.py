"""A real ``sidekey operator`` process on the session's control plane (e2e).

Started as ``sidekey operator`` with its own namespace, health and metrics
ports on loopback; ``start_operator`` waits for ``/readyz`` and fails the
test with the operator's log when it does not get there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidekey.localcluster.cluster import free_port
from tests.support.namespaces import make_namespace

#: The sidecar image the e2e operators are told the webhook injects.
SIDECAR_IMAGE = "ghcr.io/sidekey/sidekey:test-current"


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
