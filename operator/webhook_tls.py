"""The webhook's TLS: a CA, a serving certificate, and the caBundle that trusts them.

Three places hold the material:
- the CA Secret (``<tls-secret>-ca``, read by the operator only): the current
  CA's certificate and key;
- the TLS Secret (``contract.WEBHOOK_TLS_SECRET``, mounted by the webhook,
  which reloads it on change): ``tls.crt``, ``tls.key`` and ``ca.crt``, the
  bundle of CAs to trust;
- the MutatingWebhookConfiguration: every webhook's ``clientConfig.caBundle``
  is that same bundle.

Rotation never breaks admission: a new CA is added to the bundle (and the
bundle written to the webhook configuration) before any certificate it signs
is served, and the old CA stays in the bundle until it expires, so whichever
serving certificate a webhook replica still presents is trusted.

``plan`` decides (pure apart from generating keys); ``TlsManager`` reads,
writes and schedules. A webhook configuration that does not exist yet (the
chart creates it after the operator, or tests create it later) is patched
when it appears: the kopf handler on it calls ``TlsManager.request``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from sidekey.core import certificates, contract, kubeapi
from sidekey.operator import metrics, options, rest

log = logging.getLogger(__name__)
CA_KEY_KEY = "ca.key"
_SHA256 = hashes.SHA256()


@dataclass(frozen=True, slots=True)
class Material:
    ca: certificates.KeyPair
    bundle: bytes  # PEM: the current CA first, then older CAs until they expire
    serving: certificates.KeyPair
    ca_issued: bool
    serving_issued: bool


def split_pem(bundle: bytes) -> list[x509.Certificate]:
    try:
        return list(x509.load_pem_x509_certificates(bundle))
    except ValueError:
        return []


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_pair(cert_pem: bytes | None, key_pem: bytes | None) -> certificates.KeyPair | None:
    if not cert_pem or not key_pem:
        return None
    pair = certificates.KeyPair(cert_pem, key_pem)
    try:
        pair.certificate  # noqa: B018 (parses)
        serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return None
    return pair


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return (set(ext.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)})


def plan(ca_data: Mapping[str, bytes] | None, tls_data: Mapping[str, bytes] | None,
         opts: options.Options, now: datetime.datetime) -> Material:
    """The material that should be in place now, reusing what is still good."""
    timing = opts.tls
    ca = _load_pair((ca_data or {}).get(contract.TLS_CA_KEY), (ca_data or {}).get(CA_KEY_KEY))
    ca_issued = ca is None or certificates.needs_renewal(ca, before=timing.ca_renew_before, now=now)
    if ca is None or ca_issued:
        ca = certificates.make_ca(f"sidekey-webhook-ca-{now:%Y%m%d%H%M%S}",
                                  valid_for=timing.ca_validity)
    current_ca = ca.certificate
    # Keep every other CA of the old bundle (and the CA we just replaced) until it expires.
    old = split_pem((tls_data or {}).get(contract.TLS_CA_KEY) or b"")
    if ca_data and ca_data.get(contract.TLS_CA_KEY):
        old += split_pem(ca_data[contract.TLS_CA_KEY])
    keep: list[x509.Certificate] = []
    for cert in old:
        if cert.fingerprint(_SHA256) == current_ca.fingerprint(_SHA256):
            continue
        if cert.not_valid_after_utc <= now:
            continue
        if any(cert.fingerprint(_SHA256) == k.fingerprint(_SHA256) for k in keep):
            continue
        keep.append(cert)
    bundle = b"".join([_pem(current_ca), *(_pem(c) for c in keep)])

    serving = _load_pair((tls_data or {}).get(contract.TLS_CERT_KEY),
                         (tls_data or {}).get(contract.TLS_KEY_KEY))
    want_dns, want_ips = set(opts.webhook_dns_names), set(opts.webhook_ip_addresses)
    serving_issued = (
        serving is None
        or not _signed_by(serving.certificate, current_ca)
        or _sans(serving.certificate) != (want_dns, want_ips)
        or certificates.needs_renewal(serving, before=timing.cert_renew_before, now=now)
    )
    if serving is None or serving_issued:
        serving = certificates.issue(
            ca, f"{opts.webhook_service}.{opts.namespace}.svc",
            dns_names=opts.webhook_dns_names, ip_addresses=opts.webhook_ip_addresses,
            valid_for=timing.cert_validity)
    return Material(ca, bundle, serving, ca_issued, serving_issued)


def _decode(secret: Mapping[str, Any] | None) -> dict[str, bytes] | None:
    if secret is None:
        return None
    data = secret.get("data") or {}
    out: dict[str, bytes] = {}
    for k, v in data.items() if isinstance(data, Mapping) else ():
        try:
            out[str(k)] = base64.b64decode(v)
        except (ValueError, TypeError):
            continue
    return out


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in data.items()}


class TlsManager:
    def __init__(self, api: rest.Rest, opts: options.Options, stats: metrics.Metrics) -> None:
        self._api = api
        self._opts = opts
        self._stats = stats
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()  # set after the first successful ensure
        self.idle = asyncio.Event()  # set while ``run`` is not inside an ensure
        self.idle.set()
        self._stopping = asyncio.Event()

    def request(self) -> None:
        """Check soon (the webhook configuration or a Secret changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Ensure at start, then on request or every ``check_interval``; back off on errors.

        Returns after ``stop``: an ensure that has begun finishes first (``idle``
        is clear while one runs), so its CA, caBundle and serving certificate
        go out together. Cut short it would lose nothing either: the next
        ensure, here or in the next instance, plans from what the Secrets and
        the webhook configuration hold, and rotation adds a CA to the caBundle
        before any certificate it signs is served.
        """
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            self.idle.clear()
            try:
                await self.ensure()
            except Exception as exc:
                failures += 1
                delay = min(60.0, 0.5 * 2 ** failures)
                self._stats.errors.labels("tls").inc()
                log.warning("webhook TLS: %s; retrying in %.1fs", exc, delay)
            else:
                failures = 0
                delay = self._next_check()
            finally:
                self.idle.set()
            # ``stop`` sets ``_wake`` too, so a stop during the ensure ends this wait at once.
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the wait in a new task,
            # which kopf counts as a hung task of its own at shutdown
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def stop(self) -> None:
        """Begin no further ensure; ``run`` returns once the one running (if any) has finished."""
        self._stopping.set()
        self._wake.set()

    def _next_check(self) -> float:
        """Wake up at the check interval, or sooner when a renewal falls due."""
        return max(0.2, min(self._opts.tls.check_interval, self._due_in))

    _due_in: float = 3600.0
    _missing_reported = False

    async def ensure(self) -> Material:
        async with self._lock:
            return await self._ensure()

    async def _ensure(self) -> Material:
        ns, opts = self._opts.namespace, self._opts
        now = datetime.datetime.now(datetime.UTC)
        ca_secret = await self._api.get(rest.secret_path(ns, opts.ca_secret))
        tls_secret = await self._api.get(rest.secret_path(ns, opts.tls_secret))
        material = plan(_decode(ca_secret), _decode(tls_secret), opts, now)
        if material.ca_issued or ca_secret is None:
            await self._write_secret(ca_secret, opts.ca_secret, "Opaque", {
                contract.TLS_CA_KEY: material.ca.cert_pem, CA_KEY_KEY: material.ca.key_pem})
            self._stats.certificate_rotations.labels("ca").inc()
            log.info("webhook TLS: issued CA, valid until %s", material.ca.not_after.isoformat())
        # The bundle reaches the webhook configuration before a certificate it signs is served.
        await self._patch_ca_bundle(material.bundle)
        tls_data = {contract.TLS_CERT_KEY: material.serving.cert_pem,
                    contract.TLS_KEY_KEY: material.serving.key_pem,
                    contract.TLS_CA_KEY: material.bundle}
        if _decode(tls_secret) != tls_data:
            await self._write_secret(tls_secret, opts.tls_secret, "kubernetes.io/tls", tls_data)
            if material.serving_issued:
                self._stats.certificate_rotations.labels("serving").inc()
                log.info("webhook TLS: issued serving certificate for %s, valid until %s",
                         ", ".join(opts.webhook_dns_names + opts.webhook_ip_addresses),
                         material.serving.not_after.isoformat())
        self._stats.certificate_expiry.labels("ca").set(material.ca.not_after.timestamp())
        self._stats.certificate_expiry.labels("serving").set(material.serving.not_after.timestamp())
        due = min(material.ca.not_after - opts.tls.ca_renew_before,
                  material.serving.not_after - opts.tls.cert_renew_before)
        self._due_in = max(0.0, (due - now).total_seconds()) + 0.1
        self.synced.set()
        return material

    async def _write_secret(self, current: Mapping[str, Any] | None, name: str, type_: str,
                            data: Mapping[str, bytes]) -> None:
        ns = self._opts.namespace
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Secret", "type": type_,
            "metadata": {"name": name, "namespace": ns,
                         "labels": {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}},
            "data": _encode(data),
        }
        if current is None:
            await self._api.create(rest.secret_path(ns), body)
            return
        meta = current.get("metadata") or {}
        body["metadata"]["resourceVersion"] = meta.get("resourceVersion")
        body["metadata"]["labels"] = {**(meta.get("labels") or {}), **body["metadata"]["labels"]}
        if meta.get("annotations"):
            body["metadata"]["annotations"] = meta["annotations"]
        if current.get("type") not in (None, type_):
            await self._api.delete(rest.secret_path(ns, name))  # the type is immutable
            body["metadata"].pop("resourceVersion")
            await self._api.create(rest.secret_path(ns), body)
            return
        await self._api.replace(rest.secret_path(ns, name), body)

    async def _patch_ca_bundle(self, bundle: bytes) -> None:
        path = rest.webhook_configuration_path(self._opts.webhook_configuration)
        config = await self._api.get(path)
        if config is None:
            if self._missing_reported:
                return
            self._missing_reported = True
            log.info("webhook TLS: MutatingWebhookConfiguration %s does not exist yet; its "
                     "caBundle is set when it appears", self._opts.webhook_configuration)
            return
        self._missing_reported = False
        wanted = base64.b64encode(bundle).decode()
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                      "value": (config.get("metadata") or {}).get("resourceVersion")}]
        for i, hook in enumerate(config.get("webhooks") or []):
            client = hook.get("clientConfig") or {}
            if client.get("caBundle") != wanted:
                ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle",
                            "value": wanted})
        if len(ops) == 1:
            return
        try:
            await self._api.patch(path, ops, "json")
        except kubeapi.ApiError as exc:
            if exc.status == 422 and "test" in exc.message.lower():
                raise kubeapi.ApiError(409, "Conflict", "webhook configuration changed; "
                                       "retrying") from exc
            raise
        log.info("webhook TLS: caBundle of %s updated (%d CA%s)", self._opts.webhook_configuration,
                 len(split_pem(bundle)), "s" if len(split_pem(bundle)) != 1 else "")
