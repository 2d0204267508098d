"""Request targets: split off the route, refuse tricks, produce match segments.

The credential must never reach a path the policy does not allow, so the
sidecar refuses every target an upstream could read differently from us
instead of guessing how it normalises: ``..`` and ``.`` segments, percent-
encoded dots, slashes and backslashes, double encoding, empty segments
(``//``), backslashes, control characters, non-ASCII, invalid UTF-8 and
absolute-form targets (``GET http://other.host/...``). What passes is forwarded
byte for byte as the agent sent it, and matched against the allow rules in
its decoded form.

A dot segment is any segment made of dots and whitespace only, after
percent-decoding and NFKC (which folds fullwidth and one-dot-leader dots,
and no-break spaces, to ASCII): ``...``, ``..%20`` and ``..%C2%A0`` too.
Servers that trim whitespace, or treat any run of dots as "up" (Windows
paths, some static-file servers), would climb on them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from sidekey.core import errors

#: The patterns end in ``\Z``, never ``$``: ``$`` also matches before a final newline,
#: which let ``/openai/\n`` through as a segment holding a line feed.
#: Characters allowed raw in a path (RFC 3986 pchar plus '/'), and '%' for escapes.
_RAW_PATH: Final = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*\Z")
#: Characters allowed raw in a query (RFC 3986: pchar, '/', '?').
_RAW_QUERY: Final = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*\Z")
_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: Escapes that change how a path is split or climbed: '.', '/', '\', '%', controls.
_DANGEROUS_ESCAPE: Final = re.compile(r"%(2[eEfF5]|5[cC]|[01][0-9A-Fa-f]|7[fF])")


class PathError(errors.InvalidInput):
    """A refused request target; the message says what to fix (it names the part of the target)."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


@dataclass(frozen=True, slots=True)
class Target:
    route: str  # the upstream name (first segment)
    path: str  # the raw rest of the path, "" or starting with "/"; forwarded as is
    query: str  # the raw query without '?', forwarded as is (minus a credential param)
    segments: tuple[str, ...]  # decoded segments of ``path`` for the allow rules


#: The common case, checked with one regex: non-empty segments of plain
#: characters that do not start with '.', no escapes, no ';' (so no dot-segment,
#: '//', encoding or backslash trick can be in it). Anything else takes the
#: careful path below, which refuses or decodes.
_FAST_PATH: Final = re.compile(r"^(?:/[A-Za-z0-9_~:@,=+-][A-Za-z0-9._~:@,=+-]*)+/?\Z")
_FAST_QUERY: Final = re.compile(r"^[A-Za-z0-9._~!$'()*+,;=:@/?&-]*\Z")


#: Targets parsed before: agents call the same few endpoints, and a Target is immutable.
#: Only short targets are kept, and the cache is emptied when full, so it stays small.
_PARSED: Final[dict[str, Target]] = {}
_PARSED_MAX: Final = 1024
_PARSED_LONGEST: Final = 256


def parse(raw_target: str) -> Target:
    """Split and check a raw request target such as ``/openai/v1/chat/completions?x=1``."""
    target = _PARSED.get(raw_target)
    if target is not None:
        return target
    target = _parse(raw_target)  # a refused target raises and is never kept
    if len(raw_target) <= _PARSED_LONGEST:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[raw_target] = target
    return target


def _parse(raw_target: str) -> Target:
    path, sep, query = raw_target.partition("?")
    if _FAST_PATH.match(path) and (not sep or _FAST_QUERY.match(query)):
        parts = path.split("/")
        route = parts[1]
        rest = parts[2:]
        if rest and rest[-1] == "":
            rest = rest[:-1]
        return Target(route=route, path=path[len(route) + 1 :], query=query, segments=tuple(rest))
    return _parse_carefully(raw_target)


def _parse_carefully(raw_target: str) -> Target:
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise PathError("the request target must be a path starting with one '/' (no absolute URLs)")
    path, sep, query = raw_target.partition("?")
    if "#" in raw_target:
        raise PathError("the request target must not contain a fragment ('#')")
    if not _RAW_PATH.match(path):
        if "\\" in path:
            raise PathError("backslashes are not allowed in the path")
        raise PathError("the path holds characters that must be percent-encoded or are not allowed")
    if sep and not _RAW_QUERY.match(query):
        raise PathError("the query holds characters that must be percent-encoded")
    if "%" in raw_target and _ESCAPE.search(raw_target):
        raise PathError("the path or query holds a '%' that is not a valid escape")
    if "%" in path and _DANGEROUS_ESCAPE.search(path):
        raise PathError(
            "percent-encoded '.', '/', '\\', '%' or control characters are not allowed in the path"
        )
    if "%" in query and re.search(r"%([01][0-9A-Fa-f]|7[fF])", query):
        raise PathError("percent-encoded control characters are not allowed in the query")
    parts = path.split("/")  # ["", route, ...]
    route = parts[1]
    rest = parts[2:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # one trailing slash is fine; it is forwarded as sent
    segments: list[str] = []
    for seg in rest:
        if seg == "":
            raise PathError("empty path segments ('//') are not allowed")
        if "%" in seg:
            try:
                seg = unquote(seg, errors="strict")
            except UnicodeDecodeError:
                raise PathError("the path holds percent-encoded bytes that are not UTF-8") from None
            if not seg.isascii():
                folded = unicodedata.normalize("NFKC", seg)
                if "/" in folded or "\\" in folded:
                    raise PathError("slashes are not allowed inside a segment, in any encoding")
        if _is_dot_segment(seg) or _is_dot_segment(seg.split(";", 1)[0]):
            raise PathError(
                "'.' and '..' segments (or any segment of only dots and spaces) are not allowed "
                "in the path, in any encoding"
            )
        segments.append(seg)
    if _is_dot_segment(unquote(route)):
        raise PathError("'.' and '..' segments are not allowed in the path")
    if not route:
        raise PathError("the path must start with an upstream name: /<upstream>/<path>")
    return Target(route=route, path=path[len(route) + 1 :], query=query, segments=tuple(segments))


#: Unicode categories read as blank around dots: spaces, controls and format characters
#: (a zero-width space is not ``isspace()`` but is as invisible to whoever trims).
_BLANK_CATEGORIES: Final = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def _is_dot_segment(segment: str) -> bool:
    """Whether a decoded segment is only dots and blanks (with at least one dot), after NFKC."""
    if not segment or (segment[0] not in ".\t\n\v\f\r " and segment.isascii()):
        return False  # the common case: a segment that starts with a letter or digit
    folded = unicodedata.normalize("NFKC", segment)
    return "." in folded and all(
        c == "." or c.isspace() or unicodedata.category(c) in _BLANK_CATEGORIES for c in folded
    )
