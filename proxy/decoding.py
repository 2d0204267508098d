"""Undoing a compressed upstream body so the scrubber can read it.

The sidecar asks every upstream for ``Accept-Encoding: identity``: a
compressed body hides an echoed key from the scrubber, and compression on
loopback saves nothing. An upstream that compresses anyway gets its gzip or
deflate undone (with a bound on what it may grow to); any other coding, or
more than one, is refused, since such a body cannot be checked for the key.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Final

from sidekey.core import errors

#: Codings the sidecar can undo.
DECODABLE: Final = frozenset({"gzip", "x-gzip", "deflate"})


class DecodeError(errors.SidekeyError):
    """A corrupt compressed body, or one that decodes past the bound."""


def codings(values: Iterable[str]) -> list[str]:
    """Every coding named by every ``Content-Encoding`` header, ``identity`` left out."""
    found = [c.strip().lower() for v in values for c in v.split(",")]
    return [c for c in found if c and c != "identity"]


class Decoder:
    """Undoes gzip or deflate (zlib framing, detected) with a bound on the output.

    Only an upstream that ignored ``Accept-Encoding: identity`` gets here; the
    bound keeps a small compressed body from growing without limit in memory.
    """

    LIMIT: Final = 256 * 1024 * 1024

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=47)
        self._out = 0

    def feed(self, data: bytes) -> bytes:
        room = self.LIMIT - self._out + 1
        try:
            out = self._z.decompress(data, room)
        except zlib.error as exc:
            raise DecodeError("corrupt") from exc
        self._out += len(out)
        if self._out > self.LIMIT or self._z.unconsumed_tail:
            raise DecodeError("too large")
        return out

    def flush(self) -> bytes:
        try:
            out = self._z.flush()
        except zlib.error as exc:
            raise DecodeError("corrupt") from exc
        self._out += len(out)
        if self._out > self.LIMIT:
            raise DecodeError("too large")
        return out
