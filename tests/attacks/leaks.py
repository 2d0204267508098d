"""Every form in which a secret can show up: raw, URL-encoded, base64 (any alignment), basic-auth.

Written independently of the proxy's own scrubber, so a scrubber bug cannot
hide itself in the check.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable


def _b64_cores(value: bytes) -> set[bytes]:
    """Base64 text that appears whenever ``value`` is encoded inside any larger byte string.

    Encoding is 3 bytes -> 4 characters, so at each of the three alignments the
    characters that depend only on ``value`` are the full groups in the middle.
    """
    cores: set[bytes] = set()
    for shift in range(3):
        padded = b"\0" * shift + value
        encoded = base64.b64encode(padded)
        start = 4 if shift else 0  # the first group mixes in the unknown prefix
        usable = (len(padded) // 3) * 4  # the last partial group mixes in the unknown suffix
        core = encoded[start:usable]
        if len(core) >= 8:
            cores.add(core)
            cores.add(core.replace(b"+", b"-").replace(b"/", b"_"))
    return cores


def forms(secret: str) -> set[bytes]:
    raw = secret.encode()
    found = {raw, urllib.parse.quote(secret, safe="").encode(), urllib.parse.quote_plus(secret).encode(),
             urllib.parse.quote(secret).encode()}
    whole = base64.b64encode(raw)
    found |= {whole, whole.rstrip(b"="), base64.urlsafe_b64encode(raw).rstrip(b"=")}
    found |= _b64_cores(raw)
    return found


def basic_forms(username: str, password: str) -> set[bytes]:
    pair = f"{username}:{password}"
    return forms(pair) | forms(password)


def find(haystack: bytes, needles: Iterable[bytes]) -> list[bytes]:
    """The needles present in ``haystack`` (case-sensitive, as bytes)."""
    return sorted({n for n in needles if n and n in haystack})
