"""Options and fixtures of the webhook tests."""

from __future__ import annotations

import base64
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
from typing import Any

import pytest
import yaml
from cryptography import x509

from sidekey.core import certificates
from sidekey.localcluster import processes
from sidekey.webhook import configuration


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite tests/webhook/golden/*/patch.json and result.json from the current code")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))



# --- A real `sidekey webhook` registered with the real apiserver (e2e) ---------




#: Settings of the e2e webhook; the tests compare stored pods against them.
E2E_SETTINGS = {"imageAllowList": ["ghcr.io/sidekey/sidekey:0.1.0", "registry.example.com/sidekey:debug"]}
OWN_NAMESPACE = "sidekey-system"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_webhook(cluster: Any, workdir: Path, *, register: bool = True) -> Iterator[RunningWebhook]:
    """Start `sidekey webhook` with a cert for 127.0.0.1 and register it (URL clientConfig + caBundle)."""
    ca = certificates.make_ca("sidekey-webhook-test-ca")
    pair = certificates.issue(ca, "sidekey-webhook", ip_addresses=["127.0.0.1"], dns_names=["localhost"])
    tls_dir = workdir / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    (tls_dir / "tls.crt").write_bytes(pair.cert_pem)
    (tls_dir / "tls.key").write_bytes(pair.key_pem)
    settings_file = workdir / "settings.yaml"
    settings_file.write_text(yaml.safe_dump(E2E_SETTINGS))
    name = f"sidekey-e2e-{uuid.uuid4().hex[:6]}"
    with processes.Processes(workdir / "logs") as procs:
        for _attempt in range(5):
            port = _free_port()
            proc = procs.start("webhook", [
                sys.executable, "-m", "sidekey", "webhook", "--host", "127.0.0.1", "--port", str(port),
                "--tls-dir", str(tls_dir), "--settings", str(settings_file),
                "--namespace", OWN_NAMESPACE, "--kubeconfig", str(cluster.kubeconfig)])
            hook = RunningWebhook(port, ca, proc, name, tls_dir)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.running:
                with contextlib.suppress(OSError):
                    if hook.get("/readyz")[0] == 200:
                        break
                time.sleep(0.1)
            if proc.running and hook.get("/readyz")[0] == 200:
                break
            proc.stop()
        else:
            raise RuntimeError(f"sidekey webhook did not become ready:\n{proc.tail()}")
        manifest = configuration.mutating_webhook_configuration(
            ca_bundle=base64.b64encode(ca.cert_pem).decode(), url=hook.url, name=name,
            own_namespace=OWN_NAMESPACE)
        if register:
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        try:
            yield hook
        finally:
            if register:
                cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
