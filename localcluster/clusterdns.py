"""The node's cluster DNS: Service names, answered on the bridge address, and nothing else.

A cluster's pods resolve ``<service>.<namespace>.svc`` (the chart's
``helm test`` pod calls the webhook that way), so the node needs what
CoreDNS is to a cluster. This is the smallest such server: UDP, A records
for each Service's ClusterIP under ``cluster.local``, read from the
apiserver (cached for a second). A name outside the cluster's domain is
*refused*, never forwarded: no query a pod makes can leave the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

DOMAIN = "cluster.local"
TTL = 5
NOERROR, NXDOMAIN, NOTIMP, REFUSED = 0, 3, 4, 5
TYPE_A, CLASS_IN = 1, 1


def service_records(services: Mapping[str, Any]) -> dict[str, str]:
    """``name.namespace.svc.cluster.local`` -> ClusterIP, from a ServiceList."""
    records = {}
    for svc in services.get("items", []):
        ip = svc.get("spec", {}).get("clusterIP", "")
        if ip and ip != "None":
            meta = svc["metadata"]
            records[f"{meta['name']}.{meta['namespace']}.svc.{DOMAIN}"] = ip
    return records


def _question(packet: bytes) -> tuple[str, int, int, int]:
    """(name, type, class, offset after the question) of the first question."""
    labels, i = [], 12
    while packet[i] != 0:
        n = packet[i]
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[i + 1:i + 1 + n].decode("ascii").lower())
        i += 1 + n
    qtype, qclass = struct.unpack("!HH", packet[i + 1:i + 5])
    return ".".join(labels), qtype, qclass, i + 5


def answer(packet: bytes, records: Callable[[], Mapping[str, str]]) -> bytes | None:
    """The reply to one query packet (None for something that is not a query)."""
    if len(packet) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    rd = flags & 0x0100
    try:
        name, qtype, qclass, end = _question(packet)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error):
        return struct.pack("!HHHHHH", ident, 0x8000 | rd | NOTIMP, 0, 0, 0, 0)
    question = packet[12:end]
    answers = b""
    if name != DOMAIN and not name.endswith("." + DOMAIN):
        rcode = REFUSED  # not ours, and never forwarded
    elif (ip := records().get(name)) is None:
        rcode = NXDOMAIN
    else:
        rcode = NOERROR
        if qtype == TYPE_A and qclass == CLASS_IN:
            answers = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + ipaddress.IPv4Address(ip).packed
    header = struct.pack("!HHHHHH", ident, 0x8400 | rd | rcode, 1, 1 if answers else 0, 0, 0)
    return header + question + answers


class ClusterDNS:
    """Serves :func:`answer` on ``address``:53 in a daemon thread until ``stop()``."""

    def __init__(self, address: str, list_services: Callable[[], Mapping[str, Any]], port: int = 53) -> None:
        self._list = list_services
        self._cache: dict[str, str] = {}
        self._cached_at = 0.0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((address, port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
        self._thread.start()

    def records(self) -> Mapping[str, str]:
        if time.monotonic() - self._cached_at > 1.0:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._cache = service_records(self._list())
                self._cached_at = time.monotonic()
        return self._cache

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = answer(packet, self.records)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
