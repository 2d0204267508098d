"""The /etc/hosts guard: a policy hostname must not resolve to the pod itself."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from sidekey.proxy import routes, settings


class FakeInner:
    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
        return [
            {"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


def guard(address: str, pod_ip: str = "10.1.2.3") -> routes.GuardedResolver:
    r = routes.GuardedResolver(frozenset({pod_ip}))
    r._inner = FakeInner(address)  # type: ignore[assignment]
    return r


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "0.0.0.0",
        "::",
        "10.1.2.3",
        "::ffff:127.0.0.1",
    ],
)
async def test_local_addresses_are_refused(address: str) -> None:
    with pytest.raises(routes.HostRefused, match=r"api\.example"):
        await guard(address).resolve("api.example", 443)


async def test_an_ordinary_address_passes() -> None:
    results = await guard("93.184.216.34").resolve("api.example", 443)
    assert results[0]["host"] == "93.184.216.34"


async def test_a_real_lookup_of_localhost_is_refused() -> None:
    with pytest.raises(routes.HostRefused):
        await routes.GuardedResolver(frozenset()).resolve("localhost", 80)


DUAL_STACK_ENV = {"POD_NAME": "p", "POD_NAMESPACE": "n", "POD_UID": "u", "POD_SERVICE_ACCOUNT": "a",
                  "POD_IP": "10.1.2.3", "POD_IPS": "10.1.2.3,fd00:10:244::3"}


@pytest.mark.parametrize("address", ["10.1.2.3", "fd00:10:244::3", "fd00:10:244:0:0:0:0:3"])
async def test_every_address_of_a_dual_stack_pod_is_refused(address: str) -> None:
    own = settings.Settings.from_env(DUAL_STACK_ENV).own_addresses
    assert own == {"10.1.2.3", "fd00:10:244::3"}
    r = routes.GuardedResolver(own)
    r._inner = FakeInner(address)  # type: ignore[assignment]
    with pytest.raises(routes.HostRefused, match="this pod's own address"):
        await r.resolve("api.example", 80)


def test_a_pod_ips_entry_that_is_no_address_stops_the_start() -> None:
    with pytest.raises(settings.SettingsError, match="POD_IPS: 'fd00::x' is not an IP address"):
        settings.Settings.from_env({**DUAL_STACK_ENV, "POD_IPS": "10.1.2.3,fd00::x"})
