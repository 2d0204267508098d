"""When certificates are issued, and what the bundle holds, decided without a cluster."""

from __future__ import annotations

import argparse
import datetime

from cryptography import x509

from sidekey.core import certificates
from sidekey.operator import options, webhook_tls

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def _opts(*extra: str) -> options.Options:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    return options.from_args(parser.parse_args(["--namespace", "sk", *extra]))


def _secrets(m: webhook_tls.Material) -> tuple[dict[str, bytes], dict[str, bytes]]:
    return ({"ca.crt": m.ca.cert_pem, "ca.key": m.ca.key_pem},
            {"tls.crt": m.serving.cert_pem, "tls.key": m.serving.key_pem, "ca.crt": m.bundle})


def test_nothing_yet_issues_a_ca_and_a_serving_certificate_for_the_service() -> None:
    m = webhook_tls.plan(None, None, _opts("--webhook-address", "127.0.0.1"), NOW)
    assert m.ca_issued and m.serving_issued
    assert webhook_tls.split_pem(m.bundle)[0] == m.ca.certificate
    sans = m.serving.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sidekey-webhook.sk.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    m.serving.certificate.verify_directly_issued_by(m.ca.certificate)


def test_fresh_material_is_kept_as_is() -> None:
    opts = _opts()
    first = webhook_tls.plan(None, None, opts, datetime.datetime.now(datetime.UTC))
    again = webhook_tls.plan(*_secrets(first), opts, datetime.datetime.now(datetime.UTC))
    assert not again.ca_issued and not again.serving_issued
    assert again.serving.cert_pem == first.serving.cert_pem and again.bundle == first.bundle


def test_the_serving_certificate_is_renewed_with_a_third_of_its_life_left() -> None:
    opts = _opts("--cert-validity-seconds", "90")
    start = datetime.datetime.now(datetime.UTC)
    first = webhook_tls.plan(None, None, opts, start)
    assert not webhook_tls.plan(*_secrets(first), opts, start + datetime.timedelta(seconds=50)).serving_issued
    later = webhook_tls.plan(*_secrets(first), opts, start + datetime.timedelta(seconds=65))
    assert later.serving_issued and not later.ca_issued


def test_a_new_ca_keeps_the_old_one_in_the_bundle_until_it_expires() -> None:
    opts = _opts("--ca-validity-seconds", "300", "--cert-validity-seconds", "100")
    start = datetime.datetime.now(datetime.UTC)
    first = webhook_tls.plan(None, None, opts, start)
    rotated = webhook_tls.plan(*_secrets(first), opts, start + datetime.timedelta(seconds=250))
    assert rotated.ca_issued and rotated.serving_issued
    bundle = webhook_tls.split_pem(rotated.bundle)
    assert bundle == [rotated.ca.certificate, first.ca.certificate]
    rotated.serving.certificate.verify_directly_issued_by(rotated.ca.certificate)
    # once the old CA has expired, it leaves the bundle
    after = webhook_tls.plan(*_secrets(rotated), opts, start + datetime.timedelta(seconds=301))
    assert first.ca.certificate not in webhook_tls.split_pem(after.bundle)


def test_a_certificate_for_other_names_or_another_ca_is_replaced() -> None:
    opts = _opts()
    now = datetime.datetime.now(datetime.UTC)
    first = webhook_tls.plan(None, None, opts, now)
    ca, tls = _secrets(first)
    stranger = certificates.make_ca("stranger")
    tls["tls.crt"] = certificates.issue(stranger, "x", dns_names=opts.webhook_dns_names).cert_pem
    assert webhook_tls.plan(ca, tls, opts, now).serving_issued
    renamed = webhook_tls.plan(*_secrets(first), _opts("--webhook-service", "other"), now)
    assert renamed.serving_issued and not renamed.ca_issued


def test_garbage_in_the_secrets_is_replaced_not_a_crash() -> None:
    m = webhook_tls.plan({"ca.crt": b"junk", "ca.key": b"junk"},
                         {"tls.crt": b"junk", "tls.key": b"", "ca.crt": b"junk"}, _opts(), NOW)
    assert m.ca_issued and m.serving_issued
