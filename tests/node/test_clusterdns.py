"""The node's cluster DNS answers Service names and refuses every other name (never forwards)."""

from __future__ import annotations

import socket
import struct

from sidekey.localcluster import clusterdns

SERVICES = {"items": [
    {"metadata": {"name": "kubernetes", "namespace": "default"}, "spec": {"clusterIP": "10.0.0.1"}},
    {"metadata": {"name": "headless", "namespace": "team"}, "spec": {"clusterIP": "None"}},
]}


def _query(name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def _ask(name: str, qtype: int = 1) -> tuple[int, int, bytes]:
    reply = clusterdns.answer(_query(name, qtype), lambda: clusterdns.service_records(SERVICES))
    assert reply is not None
    ident, flags, _qd, ancount = struct.unpack("!HHHH", reply[:8])
    assert ident == 0x1234 and flags & 0x8000
    return flags & 0x000F, ancount, reply


def test_a_service_name_resolves_to_its_cluster_ip() -> None:
    rcode, count, reply = _ask("kubernetes.default.svc.cluster.local")
    assert (rcode, count) == (clusterdns.NOERROR, 1)
    assert socket.inet_ntoa(reply[-4:]) == "10.0.0.1"


def test_an_unknown_name_in_the_cluster_domain_does_not_exist() -> None:
    assert _ask("absent.default.svc.cluster.local")[:2] == (clusterdns.NXDOMAIN, 0)
    assert _ask("headless.team.svc.cluster.local")[:2] == (clusterdns.NXDOMAIN, 0)


def test_a_name_outside_the_cluster_is_refused_not_forwarded() -> None:
    assert _ask("pypi.org")[:2] == (clusterdns.REFUSED, 0)
    assert _ask("cluster.local.example.com")[:2] == (clusterdns.REFUSED, 0)


def test_a_known_name_asked_for_another_type_has_no_answer_but_exists() -> None:
    assert _ask("kubernetes.default.svc.cluster.local", qtype=28)[:2] == (clusterdns.NOERROR, 0)


def test_garbage_gets_no_reply_or_a_not_implemented() -> None:
    assert clusterdns.answer(b"\x00" * 5, dict) is None
    broken = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c"
    reply = clusterdns.answer(broken, dict)
    assert reply is not None and struct.unpack("!H", reply[2:4])[0] & 0xF == clusterdns.NOTIMP
