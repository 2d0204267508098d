"""Watch every DNS query this machine sends, on every interface, for a while.

The node must never make the host's resolver (an outside address) look up a
name of its own: ``kubectl logs`` without ``--kubelet-preferred-address-types
=InternalIP`` made the apiserver resolve the node's name. A raw AF_PACKET
socket sees each UDP datagram to port 53 leaving any interface; the watch
records the names asked for, so a test can check that none is the node's.
Other users of the machine may resolve their own names meanwhile, so a test
asserts on the names, not on silence.

The kernel queues only UDP datagrams to port 53 on the socket (a classic BPF
filter, as ``tcpdump 'udp dst port 53'`` compiles it): unfiltered, the
socket's buffer overflowed under the machine's other loopback traffic and
dropped the watch's own probe (one CI run).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26

#: ``udp dst port 53`` over Ethernet (IPv4 unfragmented, IPv6 without extension headers):
#: (code, jt, jf, k), as ``tcpdump -dd`` prints it.
UDP_DST_53 = (
    (0x28, 0, 0, 12), (0x15, 0, 4, 0x86DD), (0x30, 0, 0, 20), (0x15, 0, 11, 17), (0x28, 0, 0, 56),
    (0x15, 8, 9, 53), (0x15, 0, 8, 0x0800), (0x30, 0, 0, 23), (0x15, 0, 6, 17), (0x28, 0, 0, 20),
    (0x45, 4, 0, 0x1FFF), (0xB1, 0, 0, 14), (0x48, 0, 0, 16), (0x15, 0, 1, 53), (0x06, 0, 0, 0x40000),
    (0x06, 0, 0, 0),
)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach_dns_filter(sock: socket.socket) -> None:
    program = (_SockFilter * len(UDP_DST_53))(*(_SockFilter(*ins) for ins in UDP_DST_53))
    fprog = _SockFprog(len(UDP_DST_53), program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # the kernel copies the program


@dataclass
class Query:
    interface: str
    destination: str
    name: str


@dataclass
class DnsWatch:
    queries: list[Query] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def names(self) -> list[str]:
        return [q.name for q in self.queries]

    def wait_for(self, suffix: str, timeout: float = 5.0) -> bool:
        """Whether a query for a name ending in ``suffix`` is seen within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n.endswith(suffix) for n in self.names()):
                return True
            time.sleep(0.05)
        return False

    def run(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or addr[0] == "lo":
                query = _parse(addr[0], frame)
                if query is not None:
                    self.queries.append(query)


def _parse(interface: str, frame: bytes) -> Query | None:
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        dst, l4 = socket.inet_ntop(socket.AF_INET, ip[16:20]), ip[ihl:]
    elif ethertype == 0x86DD and len(ip) >= 40:
        proto, dst, l4 = ip[6], socket.inet_ntop(socket.AF_INET6, ip[24:40]), ip[40:]
    else:
        return None
    if proto != 17 or len(l4) < 8 or struct.unpack("!H", l4[2:4])[0] != 53:
        return None
    return Query(interface, dst, _qname(l4[8 + 12:]))


def _qname(data: bytes) -> str:
    labels, i = [], 0
    while i < len(data) and data[i] != 0 and len(labels) < 64:
        n = data[i]
        labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels).lower()


@contextlib.contextmanager
def watching() -> Iterator[DnsWatch]:
    """Record DNS queries until the block ends (needs root for the raw socket)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    _attach_dns_filter(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(0.2)
    watch = DnsWatch()
    thread = threading.Thread(target=watch.run, args=(sock,), daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch._stop.set()
        thread.join(2)
        sock.close()


def probe_loopback(name: str) -> None:
    """Send one query for ``name`` to 127.0.0.1:53: the watch's own check that it sees queries."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    packet = struct.pack("!HHHHHH", 0x5EED, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, ("127.0.0.1", 53))
