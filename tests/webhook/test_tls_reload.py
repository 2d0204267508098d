"""The serving certificate is reloaded from disk when it changes."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

from aiohttp import web

from sidekey.core import certificates, contract
from sidekey.webhook import metrics as metrics_mod
from sidekey.webhook import tls


def _write(directory: Path, pair: certificates.KeyPair) -> None:
    # Like the kubelet: write elsewhere, then swap atomically.
    for name, data in ((contract.TLS_CERT_KEY, pair.cert_pem), (contract.TLS_KEY_KEY, pair.key_pem)):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


async def _served_serial(port: int, ca: certificates.KeyPair) -> int:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_rotated_certificate_is_served_to_new_connections(tmp_path: Path) -> None:
    ca = certificates.make_ca("test-ca")
    first = certificates.issue(ca, "webhook", ip_addresses=["127.0.0.1"])
    second = certificates.issue(ca, "webhook", ip_addresses=["127.0.0.1"])
    _write(tmp_path, first)
    m = metrics_mod.Metrics()
    reloading = tls.ReloadingTLS(tmp_path, m)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloading.context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        assert await _served_serial(port, ca) == first.certificate.serial_number
        assert reloading.reload_if_changed() is False
        _write(tmp_path, second)
        assert reloading.reload_if_changed() is True
        assert await _served_serial(port, ca) == second.certificate.serial_number
        assert m.registry.get_sample_value("sidekey_webhook_tls_reloads_total", {"result": "ok"}) == 1
    finally:
        await runner.cleanup()


def test_a_broken_pair_keeps_the_previous_certificate(tmp_path: Path) -> None:
    ca = certificates.make_ca("test-ca")
    good = certificates.issue(ca, "webhook", ip_addresses=["127.0.0.1"])
    other = certificates.issue(ca, "webhook", ip_addresses=["127.0.0.1"])
    _write(tmp_path, good)
    m = metrics_mod.Metrics()
    reloading = tls.ReloadingTLS(tmp_path, m)
    (tmp_path / contract.TLS_KEY_KEY).write_bytes(other.key_pem)  # key no longer matches the cert
    assert reloading.reload_if_changed() is False
    assert m.registry.get_sample_value("sidekey_webhook_tls_reloads_total", {"result": "error"}) == 1


def test_a_missing_certificate_is_a_clear_start_up_error(tmp_path: Path) -> None:
    try:
        tls.ReloadingTLS(tmp_path)
    except FileNotFoundError as exc:
        assert contract.TLS_CERT_KEY in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
