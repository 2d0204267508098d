"""The operator's options, parsed once from the command line.

The flags are a contract with the Helm chart (it renders them), so their
names live here and nowhere else. Some repeat the webhook's settings on
purpose (the excluded namespaces, the sidecar images, the agents' token
audiences): the chart renders both from the same values, so the operator
judges pods by the webhook's rule (``core/optin.py``) and the guard's shape. The TLS timing flags exist so tests and
cautious operators can shorten the rotation cycle; the defaults suit a cluster.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidekey.core import contract

CertificatesMode = Literal["operator", "external"]

DEFAULT_WEBHOOK_SERVICE = "sidekey-webhook"
DEFAULT_NAMESPACE = "sidekey-system"
DAY = 86400


@dataclass(frozen=True, slots=True)
class TlsTiming:
    """How long certificates live, and when they are renewed.

    A certificate is renewed once less than a third of its life is left, so a
    serving certificate of 90 days is renewed at 60 days, and a CA of a year
    after eight months: the old CA then stays in the bundle until it expires.
    """

    ca_validity: datetime.timedelta = datetime.timedelta(days=365)
    cert_validity: datetime.timedelta = datetime.timedelta(days=90)
    check_interval: float = 3600.0

    @property
    def ca_renew_before(self) -> datetime.timedelta:
        return self.ca_validity / 3

    @property
    def cert_renew_before(self) -> datetime.timedelta:
        return self.cert_validity / 3


@dataclass(frozen=True, slots=True)
class Options:
    namespace: str
    webhook_configuration: str
    webhook_service: str
    webhook_addresses: tuple[str, ...]
    tls_secret: str
    certificates: CertificatesMode
    sidecar_image: str | None
    #: Further images a sidecar may run (the chart's sidecar.imageAllowList).
    sidecar_images: frozenset[str]
    #: Namespaces never injected besides the system ones and ours (webhook.excludedNamespaces).
    excluded_namespaces: frozenset[str]
    #: Token audiences an agent container may hold: not API credentials.
    agent_audiences: frozenset[str]
    health_port: int
    metrics_port: int
    listen_address: str
    kubeconfig: Path | None
    tls: TlsTiming
    log_level: str

    @property
    def ca_secret(self) -> str:
        """The Secret holding the CA key: separate from the TLS Secret, so the
        webhook, which mounts the TLS Secret, never holds the key that signs."""
        return f"{self.tls_secret}-ca"

    @property
    def webhook_dns_names(self) -> tuple[str, ...]:
        svc, ns = self.webhook_service, self.namespace
        names = (svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local")
        return names + tuple(a for a in self.webhook_addresses if not _is_ip(a))

    @property
    def webhook_ip_addresses(self) -> tuple[str, ...]:
        return tuple(a for a in self.webhook_addresses if _is_ip(a))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                        help="the release namespace, where the webhook's TLS Secret lives")
    parser.add_argument("--webhook-configuration", default=contract.WEBHOOK_CONFIGURATION,
                        help="the MutatingWebhookConfiguration whose caBundle the operator keeps")
    parser.add_argument("--webhook-service", default=DEFAULT_WEBHOOK_SERVICE,
                        help="the webhook's Service: the serving certificate names NAME.NS.svc etc.")
    parser.add_argument("--webhook-address", dest="webhook_addresses", action="append", default=[],
                        metavar="HOST_OR_IP",
                        help="an extra DNS name or IP for the serving certificate (repeatable)")
    parser.add_argument("--tls-secret", default=contract.WEBHOOK_TLS_SECRET,
                        help="the webhook's TLS Secret (tls.crt, tls.key, ca.crt)")
    parser.add_argument("--certificates", choices=("operator", "external"), default="operator",
                        help="operator: issue and rotate the webhook's certificates; "
                             "external: leave TLS to cert-manager")
    parser.add_argument("--sidecar-image", default=None,
                        help="the installed sidecar image, to report pods with an older one")
    parser.add_argument("--allowed-sidecar-image", dest="sidecar_images", action="append",
                        default=[], metavar="IMAGE",
                        help="a further image a pod may pick with sidekey.io/image; such pods "
                             "are current, not outdated (repeatable)")
    parser.add_argument("--excluded-namespace", dest="excluded_namespaces", action="append",
                        default=[], metavar="NAMESPACE",
                        help="a namespace the webhook never injects: its pods are never "
                             "reported as missing the sidecar (repeatable)")
    parser.add_argument("--agent-token-audience", dest="agent_audiences", action="append",
                        default=[], metavar="AUDIENCE",
                        help="a token audience agent containers may hold, which the apiserver "
                             "refuses (repeatable; default: the sidekey audience)")
    parser.add_argument("--health-port", type=_port, default=8080,
                        help="serves /healthz and /readyz (0: off)")
    parser.add_argument("--metrics-port", type=_port, default=9090,
                        help="serves /metrics (0: off)")
    parser.add_argument("--listen-address", default="0.0.0.0",  # noqa: S104 (a pod's ports)
                        help="the address the health and metrics ports listen on")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="a kubeconfig file (default: in-cluster configuration)")
    parser.add_argument("--ca-validity-seconds", type=_seconds, default=365 * DAY,
                        help="lifetime of the webhook CA; renewed with a third left")
    parser.add_argument("--cert-validity-seconds", type=_seconds, default=90 * DAY,
                        help="lifetime of the serving certificate; renewed with a third left")
    parser.add_argument("--tls-check-seconds", type=_seconds, default=3600.0,
                        help="how often the certificates are checked for renewal")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))


def from_args(args: argparse.Namespace) -> Options:
    ca = datetime.timedelta(seconds=args.ca_validity_seconds)
    cert = min(datetime.timedelta(seconds=args.cert_validity_seconds), ca)
    return Options(
        namespace=args.namespace,
        webhook_configuration=args.webhook_configuration,
        webhook_service=args.webhook_service,
        webhook_addresses=tuple(args.webhook_addresses),
        tls_secret=args.tls_secret,
        certificates=args.certificates,
        sidecar_image=args.sidecar_image or None,
        sidecar_images=frozenset(args.sidecar_images),
        excluded_namespaces=frozenset(args.excluded_namespaces),
        agent_audiences=frozenset(args.agent_audiences or [contract.DEFAULT_AUDIENCE]),
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        listen_address=args.listen_address,
        kubeconfig=args.kubeconfig,
        tls=TlsTiming(ca_validity=ca, cert_validity=cert, check_interval=args.tls_check_seconds),
        log_level=args.log_level,
    )
