"""Webhook TLS on a real control plane: issued, trusted, rotated, and followed by the caBundle.

The operator runs with lifetimes of seconds (``--ca-validity-seconds``,
``--cert-validity-seconds``) so a whole rotation cycle fits in a test.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidekey.core import contract
from tests.support.kubectl import apply, get, wait_for
from tests.support.operator import RunningOperator, start_operator

pytestmark = pytest.mark.e2e
SERVICE = "sidekey-webhook"


@pytest.fixture(scope="module")
def webhook_configuration(cluster: Any, crds: Any) -> Iterator[str]:
    """A webhook configuration that can never match a request (a label nobody sets)."""
    name = f"sidekey-test-{uuid.uuid4().hex[:6]}"
    hook = {
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Ignore",
        "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
        "objectSelector": {"matchLabels": {"sidekey.io/never": "matches"}},
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                   "resources": ["pods"]}],
    }
    apply(cluster, {"apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "MutatingWebhookConfiguration", "metadata": {"name": name},
                    "webhooks": [{**hook, "name": "one.sidekey.io"}, {**hook, "name": "two.sidekey.io"}]})
    try:
        yield name
    finally:
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, check=False)


@pytest.fixture(scope="module")
def tls_operator(cluster: Any, crds: Any, webhook_configuration: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOperator]:
    op = start_operator(cluster, tmp_path_factory.mktemp("tls"),
                        "--webhook-configuration", webhook_configuration,
                        "--webhook-service", SERVICE,
                        "--ca-validity-seconds", "30", "--cert-validity-seconds", "12",
                        "--tls-check-seconds", "1")
    try:
        yield op
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)


def _data(cluster: Any, ns: str, name: str) -> dict[str, bytes]:
    s = get(cluster, "secret", name, ns)
    assert s is not None, f"secret {ns}/{name} missing"
    return {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}


def _bundles(cluster: Any, name: str) -> list[bytes]:
    mwc = get(cluster, "mutatingwebhookconfiguration", name)
    assert mwc is not None
    return [base64.b64decode(w["clientConfig"].get("caBundle") or "") for w in mwc["webhooks"]]


def _certs(pem: bytes) -> list[x509.Certificate]:
    return list(x509.load_pem_x509_certificates(pem))


def _serial(cluster: Any, ns: str) -> int:
    return x509.load_pem_x509_certificate(_data(cluster, ns, contract.WEBHOOK_TLS_SECRET)["tls.crt"]).serial_number


def _handshake(tmp: Path, tls: dict[str, bytes], bundle: bytes, server_name: str) -> bytes:
    """Serve the Secret's certificate and connect trusting only the caBundle, as the apiserver does."""
    (tmp / "tls.crt").write_bytes(tls["tls.crt"])
    (tmp / "tls.key").write_bytes(tls["tls.key"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.create_default_context(cadata=bundle.decode())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"hello")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as conn:
            return conn.recv(5)
    finally:
        thread.join(5)
        listener.close()


def test_a_serving_certificate_is_issued_and_the_webhook_configuration_trusts_it(
        cluster: Any, tls_operator: RunningOperator, webhook_configuration: str, tmp_path: Path) -> None:
    ns = tls_operator.namespace
    secret = get(cluster, "secret", contract.WEBHOOK_TLS_SECRET, ns)
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    tls = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
    assert set(tls) == {"tls.crt", "tls.key", "ca.crt"}
    cert = x509.load_pem_x509_certificate(tls["tls.crt"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{SERVICE}.{ns}.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # the CA key lives in its own Secret, which the webhook does not mount
    ca = _data(cluster, ns, f"{contract.WEBHOOK_TLS_SECRET}-ca")
    assert b"PRIVATE KEY" in ca["ca.key"] and b"PRIVATE KEY" not in tls["ca.crt"]
    # every webhook of the configuration carries the bundle
    wait_for("caBundle", lambda: _bundles(cluster, webhook_configuration) == [tls["ca.crt"]] * 2
             or _bundles(cluster, webhook_configuration) == [_data(cluster, ns, contract.WEBHOOK_TLS_SECRET)["ca.crt"]] * 2)
    bundle = _bundles(cluster, webhook_configuration)[0]
    current = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
    assert _handshake(tmp_path, current, bundle, f"{SERVICE}.{ns}.svc") == b"hello"
    assert _handshake(tmp_path, current, bundle, "127.0.0.1") == b"hello"


def test_the_serving_certificate_is_rotated_before_it_expires_and_stays_trusted(
        cluster: Any, tls_operator: RunningOperator, webhook_configuration: str, tmp_path: Path) -> None:
    ns = tls_operator.namespace
    first = _serial(cluster, ns)
    wait_for("a new serving certificate", lambda: _serial(cluster, ns) != first, timeout=20, interval=0.25)
    tls = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
    wait_for("caBundle follows", lambda: _bundles(cluster, webhook_configuration)[0] == tls["ca.crt"]
             or _bundles(cluster, webhook_configuration)[0] == _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)["ca.crt"])
    tls = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
    assert _handshake(tmp_path, tls, _bundles(cluster, webhook_configuration)[0], f"{SERVICE}.{ns}.svc") == b"hello"
    assert tls_operator.metric('sidekey_webhook_certificate_rotations_total{certificate="serving"}') >= 2


def test_a_new_ca_joins_the_bundle_and_the_old_one_stays_during_the_overlap(
        cluster: Any, tls_operator: RunningOperator, webhook_configuration: str, tmp_path: Path) -> None:
    ns = tls_operator.namespace
    ca_name = f"{contract.WEBHOOK_TLS_SECRET}-ca"
    old_ca = _data(cluster, ns, ca_name)["ca.crt"]
    seen: dict[str, dict[str, bytes]] = {}

    def rotated() -> bool:
        tls = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
        if _data(cluster, ns, ca_name)["ca.crt"] != old_ca:
            return True
        if x509.load_pem_x509_certificate(tls["tls.crt"]).issuer == _certs(old_ca)[0].subject:
            seen["old"] = tls  # the last certificate the old CA signed
        return False

    wait_for("a new CA", rotated, timeout=40, interval=0.25)
    old_tls = seen["old"]
    new_ca = _data(cluster, ns, ca_name)["ca.crt"]

    def overlap() -> bytes | None:
        bundle = _bundles(cluster, webhook_configuration)[0]
        fingerprints = [c.fingerprint(c.signature_hash_algorithm) for c in _certs(bundle)]  # type: ignore[arg-type]
        want = [_certs(pem)[0] for pem in (new_ca, old_ca)]
        ok = [w.fingerprint(w.signature_hash_algorithm) for w in want] == fingerprints[:2]  # type: ignore[arg-type]
        return bundle if ok else None

    bundle = wait_for("bundle = [new CA, old CA]", overlap, timeout=10)
    assert _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)["ca.crt"] == bundle
    # a webhook replica that still serves the old certificate is trusted, and so is the new one
    assert _handshake(tmp_path, old_tls, bundle, f"{SERVICE}.{ns}.svc") == b"hello"
    new_tls = _data(cluster, ns, contract.WEBHOOK_TLS_SECRET)
    assert x509.load_pem_x509_certificate(new_tls["tls.crt"]).issuer == _certs(new_ca)[0].subject
    assert _handshake(tmp_path, new_tls, bundle, f"{SERVICE}.{ns}.svc") == b"hello"


def test_a_caBundle_reset_by_someone_else_is_restored(
        cluster: Any, tls_operator: RunningOperator, webhook_configuration: str) -> None:
    cluster.kubectl("patch", "mutatingwebhookconfiguration", webhook_configuration, "--type=json", "-p",
                    json.dumps([{"op": "remove", "path": "/webhooks/1/clientConfig/caBundle"}]))
    wait_for("restored", lambda: (b := _bundles(cluster, webhook_configuration)) and b[1] and b[0] == b[1],
             timeout=10)


def test_a_deleted_tls_secret_is_recreated(cluster: Any, tls_operator: RunningOperator) -> None:
    ns = tls_operator.namespace
    cluster.kubectl("delete", "secret", contract.WEBHOOK_TLS_SECRET, "-n", ns)
    wait_for("recreated", lambda: get(cluster, "secret", contract.WEBHOOK_TLS_SECRET, ns), timeout=10)


#: Seconds from SIGTERM to exit. kopf alone waits 5 s for any task created after it
#: started that is still running at the end (operator/main.py says what stops each).
STOPS_WITHIN = 3.0


def _sigterm_stops_promptly_and_cleanly(op: RunningOperator) -> None:
    began = time.monotonic()
    op.process.terminate()
    try:
        code = op.process.wait(timeout=STOPS_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOPS_WITHIN:.0f}s after SIGTERM:\n{op.output()[-2000:]}")
    assert code == 0, op.output()[-2000:]
    assert "stopping: cancelled after" not in op.output()
    print(f"SIGTERM to exit: {time.monotonic() - began:.2f}s")


def test_external_certificates_leave_tls_alone_and_sigterm_stops_cleanly(cluster: Any, crds: Any, tmp_path: Path) -> None:
    op = start_operator(cluster, tmp_path, "--certificates", "external",
                        "--webhook-configuration", "sidekey-none")
    try:
        assert op.get(op.health_port, "/readyz") == (200, '{"ready": true, "failing": {}}')
        assert get(cluster, "secret", contract.WEBHOOK_TLS_SECRET, op.namespace) is None
        assert get(cluster, "secret", f"{contract.WEBHOOK_TLS_SECRET}-ca", op.namespace) is None
        # and SIGTERM stops it promptly and cleanly
        _sigterm_stops_promptly_and_cleanly(op)
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)


def test_sigterm_stops_the_operator_promptly_while_it_keeps_tls_and_serves_keep_alive_clients(
        cluster: Any, crds: Any, tmp_path: Path) -> None:
    # Its own webhook configuration name, which does not exist: the module's operator
    # owns the configuration the other tests look at.
    op = start_operator(cluster, tmp_path, "--webhook-configuration", f"sidekey-none-{uuid.uuid4().hex[:6]}",
                        "--webhook-service", SERVICE, "--tls-check-seconds", "1")
    clients: list[http.client.HTTPConnection] = []
    try:
        assert get(cluster, "secret", contract.WEBHOOK_TLS_SECRET, op.namespace) is not None
        # a scraper and a prober that keep their connections open, as Prometheus and the kubelet do
        for port, path in ((op.metrics_port, "/metrics"), (op.health_port, "/readyz")):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            client.request("GET", path)
            response = client.getresponse()
            response.read()
            assert response.status == 200 and not response.will_close
            clients.append(client)
        time.sleep(1.5)  # the TLS loop is between two checks
        _sigterm_stops_promptly_and_cleanly(op)
    finally:
        for client in clients:
            client.close()
        op.stop()
        cluster.kubectl("delete", "namespace", op.namespace, "--wait=false", check=False)
