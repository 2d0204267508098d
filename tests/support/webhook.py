"""A real ``sidekey webhook`` process, registered with the real apiserver (e2e).

It serves a certificate for 127.0.0.1 from a CA made here, and is registered
with the configuration the chart renders, rewritten to its local URL
(``localcluster.helm.local_webhook_configuration``), so the tests exercise
exactly the rules, matchConditions and selectors ``helm install`` registers.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509

from sidekey.core import certificates, contract
from sidekey.localcluster import helm, processes
from sidekey.localcluster.cluster import LocalCluster, free_port

#: Settings of the e2e webhook; the tests compare stored pods against them.
E2E_SETTINGS = {"imageAllowList": ["ghcr.io/sidekey/sidekey:0.1.0", "registry.example.com/sidekey:debug"]}
#: The webhook's own namespace (the chart's release namespace), which it never mutates.
OWN_NAMESPACE = helm.NAMESPACE


@dataclass
class RunningWebhook:
    port: int
    ca: certificates.KeyPair
    process: processes.Process
    config_name: str
    tls_dir: Path

    def served_serial(self) -> int:
        """The serial number of the certificate the webhook serves right now."""
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem.decode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        ctx = ssl.create_default_context(cadata=self.ca.cert_pem.decode())
        try:
            with urllib.request.urlopen(self.url + path, context=ctx, timeout=5) as resp:  # noqa: S310
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ready(self) -> bool:
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False


@contextlib.contextmanager
def running_webhook(cluster: LocalCluster, workdir: Path, *, register: bool = True) -> Iterator[RunningWebhook]:
    """Start ``sidekey webhook`` with a cert for 127.0.0.1 and (unless told not to) register it."""
    ca = certificates.make_ca("sidekey-webhook-test-ca")
    pair = certificates.issue(ca, "sidekey-webhook", ip_addresses=["127.0.0.1"], dns_names=["localhost"])
    tls_dir = workdir / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    (tls_dir / contract.TLS_CERT_KEY).write_bytes(pair.cert_pem)
    (tls_dir / contract.TLS_KEY_KEY).write_bytes(pair.key_pem)
    settings_file = workdir / "settings.yaml"
    settings_file.write_text(yaml.safe_dump(E2E_SETTINGS))
    name = f"sidekey-e2e-{uuid.uuid4().hex[:6]}"
    with processes.Processes(workdir / "logs") as procs:
        for _attempt in range(5):  # a free port can be taken again before the webhook binds it
            port = free_port()
            proc = procs.start("webhook", [
                sys.executable, "-m", "sidekey", "webhook", "--host", "127.0.0.1", "--port", str(port),
                "--tls-dir", str(tls_dir), "--settings", str(settings_file),
                "--namespace", OWN_NAMESPACE, "--kubeconfig", str(cluster.kubeconfig)])
            hook = RunningWebhook(port, ca, proc, name, tls_dir)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.running and not hook.ready():
                time.sleep(0.1)
            if proc.running and hook.ready():
                break
            proc.stop()
        else:
            raise RuntimeError(f"sidekey webhook did not become ready:\n{proc.tail()}")
        if register:
            manifest = helm.local_webhook_configuration(hook.url, ca.cert_pem, name=name)
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        try:
            yield hook
        finally:
            if register:
                cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
