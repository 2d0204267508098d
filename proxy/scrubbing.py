"""Keep the key from flowing back to the agent.

Upstream error pages and redirects often echo credentials (a ``Location``
with ``?key=...``, a 401 page quoting the header). Every secret the sidecar
attaches is removed from response headers and bodies in the forms it is
likely to be echoed in: raw, URL-encoded, base64 (at every byte alignment,
so it is found inside a larger base64 blob such as a basic-auth header) and
base64url. Matches are replaced by as many ``*`` so ``Content-Length`` stays
true and nothing has to be buffered.

Streamed bodies are scrubbed across chunk boundaries: only the shortest tail
that could be the start of a secret is held back, so an SSE event still goes
out the moment it arrives (events end in newlines, which no key starts with).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, quote_plus

#: Secrets shorter than this are not scrubbed in encoded forms (too many false hits).
MIN_ENCODED_LENGTH: Final = 8


def _b64_cores(value: bytes) -> set[bytes]:
    """The base64 characters that encode ``value`` at byte offsets 0, 1 and 2."""
    cores: set[bytes] = set()
    for offset in range(3):
        enc = base64.b64encode(b"\0" * offset + value)
        start = (offset * 8 + 5) // 6
        end = ((offset + len(value)) * 8) // 6
        core = enc[start:end]
        if len(core) >= MIN_ENCODED_LENGTH:
            cores.add(core)
            cores.add(core.replace(b"+", b"-").replace(b"/", b"_"))
    return cores


def forms(secret: str) -> set[bytes]:
    """Every encoded form of one secret that the scrubber looks for."""
    raw = secret.encode()
    if not raw:
        return set()
    found = {raw}
    if len(raw) >= MIN_ENCODED_LENGTH:
        for enc in (quote(secret, safe=""), quote_plus(secret), quote(secret, safe="/")):
            found.add(enc.encode())
            found.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), enc).encode())
        found |= _b64_cores(raw)
    return found


class Scrubber:
    """Finds any of a fixed set of byte strings; immutable, shared by all requests of a route."""

    __slots__ = ("_alphabet", "_first", "_longest", "_patterns", "_regex")

    def __init__(self, secrets: Iterable[str], extra_forms: Iterable[bytes] = ()) -> None:
        patterns: set[bytes] = set(extra_forms)
        for s in secrets:
            patterns |= forms(s)
        patterns.discard(b"")
        self._patterns = tuple(sorted(patterns, key=len, reverse=True))
        self._longest = max((len(p) for p in self._patterns), default=0)
        self._first = frozenset(p[:1] for p in self._patterns)
        #: Every byte value that occurs in some form. A held-back tail is a prefix of a
        #: form, so all its bytes, the chunk's last byte included, are among these.
        self._alphabet = frozenset(b"".join(self._patterns))
        self._regex = re.compile(b"|".join(re.escape(p) for p in self._patterns)) if self._patterns else None

    @property
    def empty(self) -> bool:
        return self._regex is None

    def scrub(self, data: bytes) -> bytes:
        """Replace every whole occurrence in ``data``."""
        if self._regex is None or self._regex.search(data) is None:
            return data
        return self._regex.sub(lambda m: b"*" * (m.end() - m.start()), data)

    def contains_text(self, text: str) -> bool:
        """Whether any secret form occurs in ``text`` (header values, joined)."""
        if self._regex is None:
            return False
        return self._regex.search(text.encode("latin-1", "replace")) is not None

    def scrub_text(self, text: str) -> str:
        """Header values: text in, text out."""
        if self._regex is None:
            return text
        data = text.encode("latin-1", "replace")
        cleaned = self.scrub(data)
        return text if cleaned is data else cleaned.decode("latin-1")

    def held_back(self, data: bytes) -> int:
        """How many trailing bytes could start a secret and must wait for more data."""
        if self._regex is None or not data or data[-1] not in self._alphabet:
            return 0  # SSE events end in a newline, which no form holds: nothing to wait for
        window = min(len(data), self._longest - 1)
        start = len(data) - window
        best = 0
        for first in self._first:
            i = data.find(first, start)
            while i >= 0:
                tail = data[i:]
                if len(tail) <= best:
                    break  # later positions only give shorter tails
                if any(p.startswith(tail) for p in self._patterns):
                    best = len(tail)
                    break
                i = data.find(first, i + 1)
        return best

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)


class StreamScrubber:
    """Per-response state: the held-back tail between chunks."""

    __slots__ = ("_pending", "_scrubber")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Scrub a chunk; return what can be sent now."""
        s = self._scrubber
        data = self._pending + chunk if self._pending else chunk
        data = s.scrub(data)
        hold = s.held_back(data)
        if hold:
            self._pending = data[-hold:]
            return data[:-hold]
        self._pending = b""
        return data

    def flush(self) -> bytes:
        """The end of the body: the held-back tail is no secret (or it would have matched)."""
        rest, self._pending = self._pending, b""
        return rest
