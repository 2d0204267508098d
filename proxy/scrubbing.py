"""Keep the key from flowing back to the agent.

Upstream error pages and redirects often echo credentials (a ``Location``
with ``?key=...``, a 401 page quoting the header). Every secret the sidecar
attaches is removed from response headers and bodies in the forms it is
likely to be echoed in: raw, and base64 (at every byte alignment, so it is
found inside a larger base64 blob such as a basic-auth header) and
base64url, each *spelled* any way an encoder writes text. Matches are
replaced by as many ``*`` so ``Content-Length`` stays true and nothing has
to be buffered.

Spellings. Encoders escape the punctuation of a key, not its letters and
digits, and each escapes a different set: ``quote`` every ``/``,
``encodeURIComponent`` not ``!``, Go's JSON ``&`` ``<`` ``>`` as ``\\u0026``,
PHP's JSON ``/`` as ``\\/``, HTML ``&`` as ``&amp;`` or ``&#38;``. Listing
whole encoded strings misses every mix, so a form is a sequence of
*units*, one per character: a letter or digit has one spelling, any other
character all of its spellings (raw, ``%2F``/``%2f``, ``\\u002F``/``\\u002f``,
``\\x2f``, ``\\/``, ``&#47;``, ``&#047;``, ``&#x2F;``, ``&sol;``, ``%252F`` when
encoded twice, ``+`` for a space), chosen independently. The forms are one
regular expression of those units. The key is also looked for lowercased and
uppercased whole, as a page that folds what it quotes would echo it.

Speed. Letters and digits have one spelling, so the longest run of them in
a form is in every spelling of it: one substring search per form's *anchor*
rules out almost every chunk before the regular expression runs.

Streamed bodies are scrubbed across chunk boundaries: only the shortest tail
that could be the start of a secret is held back, so an SSE event still goes
out the moment it arrives (events end in newlines, which no spelling holds).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Final

#: Secrets shorter than this are scrubbed raw only (too many false hits encoded).
MIN_ENCODED_LENGTH: Final = 8

#: One character's spellings; a form is a sequence of units.
Unit = tuple[bytes, ...]

#: HTML5 character references by code point, ASCII only (``&sol;``, ``&plus;``, ``&excl;``...);
#: ``&amp;`` and friends also without the ``;`` that old pages omit. Written out rather than
#: read from ``html.entities``, whose 2,231-name table cost every sidecar 0.5 MB of private
#: memory for these 53; tests/proxy/test_scrubbing.py holds the two equal.
_NAMED: Final[dict[int, tuple[str, ...]]] = {
    9: ('&Tab;',),  # '\t'
    10: ('&NewLine;',),  # '\n'
    33: ('&excl;',),  # '!'
    34: ('&QUOT', '&quot', '&QUOT;', '&quot;'),  # '"'
    35: ('&num;',),  # '#'
    36: ('&dollar;',),  # '$'
    37: ('&percnt;',),  # '%'
    38: ('&AMP', '&amp', '&AMP;', '&amp;'),  # '&'
    39: ('&apos;',),  # "'"
    40: ('&lpar;',),  # '('
    41: ('&rpar;',),  # ')'
    42: ('&ast;', '&midast;'),  # '*'
    43: ('&plus;',),  # '+'
    44: ('&comma;',),  # ','
    46: ('&period;',),  # '.'
    47: ('&sol;',),  # '/'
    58: ('&colon;',),  # ':'
    59: ('&semi;',),  # ';'
    60: ('&LT', '&lt', '&LT;', '&lt;'),  # '<'
    61: ('&equals;',),  # '='
    62: ('&GT', '&gt', '&GT;', '&gt;'),  # '>'
    63: ('&quest;',),  # '?'
    64: ('&commat;',),  # '@'
    91: ('&lbrack;', '&lsqb;'),  # '['
    92: ('&bsol;',),  # '\\'
    93: ('&rbrack;', '&rsqb;'),  # ']'
    94: ('&Hat;',),  # '^'
    95: ('&lowbar;', '&UnderBar;'),  # '_'
    96: ('&DiacriticalGrave;', '&grave;'),  # '`'
    123: ('&lbrace;', '&lcub;'),  # '{'
    124: ('&verbar;', '&vert;', '&VerticalLine;'),  # '|'
    125: ('&rbrace;', '&rcub;'),  # '}'
}
#: JSON's two-character escapes (RFC 8259 §7) for the characters a key can hold.
_JSON_SHORT: Final = {"/": "\\/", "\\": "\\\\", '"': '\\"'}


@functools.cache  # per character: keys share their alphabet, and a route rebuild makes many forms
def spellings(ch: str) -> Unit:
    """Every way a common encoder writes one character of a secret, raw first."""
    raw = ch.encode()
    if ch.isascii() and ch.isalnum():
        return (raw,)
    found: list[str] = []
    hexes = "".join(f"%{b:02X}" for b in raw)
    found += [hexes, hexes.lower()]  # URL encodings: quote, quote_plus, encodeURIComponent
    twice = hexes.replace("%", "%25")  # a URL encoded into another URL (a redirect's ``next=``)
    found += [twice, twice.lower()]
    code = ord(ch)
    utf16 = ch.encode("utf-16-be")  # JSON writes an astral character as a surrogate pair
    json_escape = "".join(f"\\u{int.from_bytes(utf16[i:i + 2]):04X}" for i in range(0, len(utf16), 2))
    found += [json_escape, json_escape.lower()]
    if code < 0x100:
        found += [f"\\x{code:02X}", f"\\x{code:02x}"]  # JavaScript and Python string literals
    if ch in _JSON_SHORT:
        found.append(_JSON_SHORT[ch])
    found += [f"&#{code};", f"&#x{code:X};", f"&#x{code:x};"]  # HTML character references
    # ... with leading zeros: PHP's htmlspecialchars writes ``&#039;``, others pad to 4 digits
    found += [f"&#{code:03d};", f"&#{code:04d};", f"&#x{code:02X};", f"&#x{code:02x};",
              f"&#x{code:04X};", f"&#x{code:04x};"]
    found += list(_NAMED.get(code, ()))
    if ch == " ":
        found.append("+")  # form encoding (quote_plus)
    return (raw, *dict.fromkeys(s.encode() for s in found if s.encode() != raw))


def _b64_cores(value: bytes) -> list[str]:
    """The base64 characters that encode ``value`` at byte offsets 0, 1 and 2, and base64url."""
    cores: list[str] = []
    for offset in range(3):
        enc = base64.b64encode(b"\0" * offset + value).decode()
        start = (offset * 8 + 5) // 6
        end = ((offset + len(value)) * 8) // 6
        core = enc[start:end]
        if len(core) >= MIN_ENCODED_LENGTH:
            cores += [core, core.replace("+", "-").replace("/", "_")]
    return cores


def forms(secret: str) -> list[tuple[Unit, ...]]:
    """The forms of one secret the scrubber looks for, each a sequence of units."""
    if not secret:
        return []
    if len(secret.encode()) < MIN_ENCODED_LENGTH:
        return [tuple((ch.encode(),) for ch in secret)]
    # an echo may change the case of the key (a log line or an error page that folds what it
    # quotes); base64 is not case-folded: that would encode other bytes
    texts = [secret, secret.lower(), secret.upper(), *_b64_cores(secret.encode())]
    return [tuple(spellings(ch) for ch in text) for text in dict.fromkeys(texts)]


def _anchor(form: Sequence[Unit]) -> bytes:
    """The longest run of one-spelling units: bytes every spelling of the form contains."""
    best, run = b"", b""
    for unit in form:
        if len(unit) == 1:
            run += unit[0]
            if len(run) > len(best):
                best = run
        else:
            run = b""
    return best


@functools.cache
def _unit_regex(unit: Unit) -> bytes:
    if len(unit) == 1:
        return re.escape(unit[0])
    # longer spellings first: '&amp;' before '&'
    return b"(?:" + b"|".join(re.escape(s) for s in sorted(unit, key=len, reverse=True)) + b")"


def _regex(form: Sequence[Unit]) -> bytes:
    return b"".join(map(_unit_regex, form))


def _could_start(form: Sequence[Unit], tail: bytes) -> bool:
    """Whether ``tail`` is the beginning of some spelling of ``form`` (and not all of one)."""
    stack = [(0, 0)]  # (unit, offset in tail)
    while stack:
        k, off = stack.pop()
        if off == len(tail):
            return True
        if k == len(form):
            continue
        rest = tail[off:]
        for s in form[k]:
            if rest.startswith(s):
                stack.append((k + 1, off + len(s)))
            elif s.startswith(rest):
                return True
    return False


class Scrubber:
    """Finds any spelling of a fixed set of secrets; immutable, shared by all requests of a route."""

    __slots__ = ("_alphabet", "_anchors", "_by_first", "_longest", "_regex", "_shortest")

    def __init__(self, secrets: Iterable[str]) -> None:
        found: list[tuple[Unit, ...]] = []
        for s in secrets:
            found += forms(s)
        # the longest first, so a pair is starred whole rather than its password alone
        found = sorted(dict.fromkeys(found), key=len, reverse=True)
        self._longest = max((sum(max(map(len, u)) for u in f) for f in found), default=0)
        #: No spelling of any form is shorter: a shorter piece (a reason phrase "OK") holds none.
        self._shortest = min((sum(min(map(len, u)) for u in f) for f in found), default=0)
        anchors = [_anchor(f) for f in found]
        #: None: some form is all punctuation (no anchor), so every chunk takes the regex.
        self._anchors: tuple[bytes, ...] | None = tuple(dict.fromkeys(anchors)) if all(anchors) else None
        #: Forms by the first byte of each of their first unit's spellings (for held_back).
        self._by_first: dict[int, list[tuple[Unit, ...]]] = {}
        for f in found:
            for first in {s[0] for s in f[0]}:
                self._by_first.setdefault(first, []).append(f)
        #: Every byte value that occurs in some spelling. A held-back tail is a prefix of a
        #: spelling, so all its bytes, the chunk's last byte included, are among these.
        self._alphabet = frozenset(b"".join({s for f in found for u in set(f) for s in u}))
        self._regex = re.compile(b"|".join(_regex(f) for f in found)) if found else None
        # ``re.compile`` also keeps every pattern in the module's cache, up to 512 of them: one
        # for each key a rotation ever brought, the old key spelled out in it (60 keys held
        # 760 KiB more than without; up to 512 would hold several MB). The Scrubber holds its
        # own pattern, so the cache is emptied here; a rebuild is rare, and whatever else was
        # cached is compiled again once when next used.
        re.purge()

    @property
    def empty(self) -> bool:
        return self._regex is None

    def _maybe(self, data: bytes) -> bool:
        """False when no secret can be in ``data``: none of the anchors occurs.

        One substring search per anchor, at every size. A single regex of the anchors
        was tried for small chunks: it steps byte by byte, and even on an 84-byte
        header block it cost more than five ``find``s (python -m bench.instructions,
        1,000 instructions a request more); on a 150-byte SSE event the two are even.
        """
        anchors = self._anchors
        if anchors is None:
            return True
        # ``partition``, not ``in`` or ``find``: ``bytes in bytes`` first tries the needle as
        # an int and raises (and clears) a TypeError with a formatted message, and ``find``
        # parses its arguments as a tuple (METH_VARARGS); ``partition`` takes one argument
        # directly, the same search for about 30 % less a call
        partition = data.partition
        for a in anchors:  # noqa: SIM110 - a loop, not a generator per chunk
            if partition(a)[1]:
                return True
        return False

    def scrub(self, data: bytes) -> bytes:
        """Replace every whole occurrence in ``data``."""
        regex = self._regex
        if regex is None or len(data) < self._shortest:
            return data
        if not self._maybe(data):
            return data
        if regex.search(data) is None:
            return data
        return regex.sub(lambda m: b"*" * (m.end() - m.start()), data)

    def contains_text(self, text: str) -> bool:
        """Whether any secret form occurs in ``text`` (header values, joined)."""
        if self._regex is None:
            return False
        data = text.encode("latin-1", "replace")
        return self._maybe(data) and self._regex.search(data) is not None

    def scrub_text(self, text: str) -> str:
        """Header names and values: text in, text out (a ``*`` is a token character)."""
        if self._regex is None:
            return text
        data = text.encode("latin-1", "replace")
        cleaned = self.scrub(data)
        return text if cleaned is data else cleaned.decode("latin-1")

    def scrub_header_name(self, name: str) -> str:
        """A header name is a token like any other text; the same scrub keeps it one (``*`` is a tchar).

        A method, not a class-level alias of ``scrub_text``: compiled (setup.py), the alias
        left a KeyError set that a later call reported as a SystemError."""
        return self.scrub_text(name)

    def held_back(self, data: bytes) -> int:
        """How many trailing bytes could start a secret and must wait for more data."""
        if self._regex is None or not data or data[-1] not in self._alphabet:
            return 0  # SSE events end in a newline, which no spelling holds: nothing to wait for
        start = len(data) - min(len(data), self._longest - 1)
        by_first = self._by_first
        for i in range(start, len(data)):  # the earliest start gives the longest tail
            candidates = by_first.get(data[i])
            if candidates is not None:
                tail = data[i:]
                if any(_could_start(f, tail) for f in candidates):
                    return len(data) - i
        return 0

    def release(self, pending: bytes, chunk: bytes) -> tuple[bytes, bytes]:
        """A streamed body's next ``chunk``, scrubbed: what can be sent now, and the tail held back.

        ``pending`` is the tail held back after the chunk before. The relay and
        ``StreamScrubber`` both call this, so what a stream releases has one rule.
        """
        data = self.scrub(pending + chunk if pending else chunk)
        hold = self.held_back(data)
        if hold:
            return data[:-hold], data[-hold:]
        return data, b""

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
        data, self._pending = self._scrubber.release(self._pending, chunk)
        return data

    def flush(self) -> bytes:
        """The end of the body: the held-back tail is no secret (or it would have matched)."""
        rest, self._pending = self._pending, b""
        return rest
