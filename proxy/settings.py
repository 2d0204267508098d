"""The sidecar's settings, from its environment only (the webhook writes it).

A missing downward-API value is a broken injection, not something to guess
around: the sidecar refuses to start and says which variable is missing.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sidekey.core import contract, errors

DEFAULT_DRAIN_SECONDS: Final = 25.0
#: A benchmark knob, never set in a pod: ``0`` turns the token cache off, so every
#: request pays the full signature and claims check (what a first call costs).
ENV_TOKEN_CACHE: Final = "SIDEKEY_TOKEN_CACHE"


class SettingsError(errors.InvalidInput):
    """An environment variable the sidecar cannot use; ``field`` is its name."""

    type = "invalid_settings"


@dataclass(frozen=True, slots=True)
class Settings:
    pod_name: str
    namespace: str
    pod_uid: str
    pod_ip: str
    service_account: str
    port: int = contract.DEFAULT_PROXY_PORT
    health_port: int = contract.DEFAULT_HEALTH_PORT
    health_address: str = "0.0.0.0"  # noqa: S104 - scraped from outside the pod; never carries secrets
    audience: str = contract.DEFAULT_AUDIENCE
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    log_level: str = "info"
    token_cache: bool = True
    #: Every address of the pod (``status.podIPs``: two in a dual-stack cluster).
    pod_ips: tuple[str, ...] = ()

    @property
    def own_addresses(self) -> frozenset[str]:
        """The pod's own IPs, which no policy hostname may resolve to."""
        return frozenset({self.pod_ip, *self.pod_ips} - {""})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise SettingsError(name, "is not set: the sidecar needs it from the downward API")
            return value

        def port(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:  # "²" is a digit to isdigit()
                raise SettingsError(name, f"{raw!r} is not a port number")
            return int(raw)

        pod_ip = env.get(contract.ENV_POD_IP, "").strip()
        pod_ips = tuple(ip.strip() for ip in env.get(contract.ENV_POD_IPS, "").split(",") if ip.strip())
        for ip in filter(None, (pod_ip, *pod_ips)):
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                where = contract.ENV_POD_IP if ip == pod_ip else contract.ENV_POD_IPS
                raise SettingsError(where, f"{ip!r} is not an IP address") from None
        drain_raw = env.get(contract.ENV_DRAIN_SECONDS, "").strip()
        try:
            drain = float(drain_raw) if drain_raw else DEFAULT_DRAIN_SECONDS
        except ValueError:
            raise SettingsError(contract.ENV_DRAIN_SECONDS, f"{drain_raw!r} is not a number") from None
        settings = cls(
            pod_name=required(contract.ENV_POD_NAME),
            namespace=required(contract.ENV_POD_NAMESPACE),
            pod_uid=required(contract.ENV_POD_UID),
            pod_ip=pod_ip,
            service_account=required(contract.ENV_SERVICE_ACCOUNT),
            port=port(contract.ENV_PROXY_PORT, contract.DEFAULT_PROXY_PORT),
            health_port=port(contract.ENV_HEALTH_PORT, contract.DEFAULT_HEALTH_PORT),
            health_address=env.get(contract.ENV_HEALTH_ADDRESS, "").strip() or "0.0.0.0",  # noqa: S104
            audience=env.get(contract.ENV_AUDIENCE, "").strip() or contract.DEFAULT_AUDIENCE,
            drain_seconds=max(0.0, drain),
            log_level=env.get(contract.ENV_LOG_LEVEL, "").strip().lower() or "info",
            token_cache=env.get(ENV_TOKEN_CACHE, "").strip() != "0",
            pod_ips=pod_ips,
        )
        if settings.port == settings.health_port:
            raise SettingsError(contract.ENV_HEALTH_PORT, f"must differ from {contract.ENV_PROXY_PORT}")
        return settings
