"""The audit line: one per request, its fields typed, its timestamp cheap.

Every request ends in exactly one line, whatever path it took (refused,
forwarded, cut by either side), so the record is created when the request
arrives and filled in as it goes. The path is redacted (query values
replaced) because agents put keys and personal data in queries.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _esc  # the C function json.dumps uses
from typing import Final, TypedDict


class AuditRecord(TypedDict, total=False):
    request_id: str
    pod: str
    namespace: str
    service_account: str | None
    upstream: str | None
    method: str
    path: str
    decision: str  # allowed, denied, error
    reason: str  # ok, or the refusal's word (not_allowed, upstream_timeout, client_disconnected, ...)
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    time: str
    streamed: bool
    model: str  # LLM upstreams (api set): the model the request named
    tokens: dict[str, int | bool]  # LLM upstreams: input, output, cached, estimated


#: The fields of an allowed call that ran to its end, the line nearly every request writes.
_PLAIN: Final = frozenset({
    "request_id", "pod", "namespace", "service_account", "upstream", "method", "path", "decision",
    "reason", "bytes_in", "bytes_out", "status", "duration_ms", "time",
})
_PLAIN_STREAMED: Final = _PLAIN | {"streamed"}


class LineEncoder:
    """The common audit line without the generic JSON encoder (1.7 µs instead of 5).

    The pod and namespace, the same on every line, are encoded once; the other
    strings are escaped by the C function ``json`` itself uses, the numbers
    written as ``json`` writes them, so the line parses to the same object.
    A record of any other shape (a refusal, an LLM call's tokens) gets None:
    the writer's ``json`` encodes it.
    """

    __slots__ = ("_constant", "_namespace", "_pod", "_who", "_why")

    def __init__(self, pod: str, namespace: str) -> None:
        self._pod = pod
        self._namespace = namespace
        self._constant = f',"pod":{_esc(pod)},"namespace":{_esc(namespace)},"service_account":'
        #: The encoded runs between the per-request values, by the strings they hold: the same
        #: few service accounts, upstreams, methods, decisions and reasons on nearly every line.
        self._who: dict[tuple[str | None, str | None, str], str] = {}
        self._why: dict[tuple[str, str], str] = {}

    def encode(self, r: AuditRecord) -> str | None:
        # The shape without comparing key sets: 14 (or 15) entries, each of the 14 (and
        # "streamed") read by name below, are exactly those keys; any other is a KeyError.
        size = len(r)
        if size != 14 and size != 15:
            return None
        # the numbers read untyped: compiled (setup.py), a value the TypedDict types as int is
        # unboxed on reading, so a bool would pass the type() checks below as 1
        m: Mapping[str, object] = r
        try:
            if r["pod"] != self._pod or r["namespace"] != self._namespace:
                return None
            bytes_in, bytes_out, status, duration = m["bytes_in"], m["bytes_out"], m["status"], m["duration_ms"]
            if not (type(bytes_in) is int and type(bytes_out) is int and type(status) is int
                    and type(duration) is float):
                return None
            if size == 14:
                streamed = ""
            elif m["streamed"] is True:
                streamed = '"streamed":true,'
            else:
                return None
            who_key = (r["service_account"], r["upstream"], r["method"])
            why_key = (r["decision"], r["reason"])
            request_id, path, time_ = r["request_id"], r["path"], r["time"]
        except KeyError:
            return None
        who = self._who.get(who_key)
        if who is None:
            who = self._who_run(who_key)
        why = self._why.get(why_key)
        if why is None:
            why = self._why_run(why_key)
        # Every part a str, so that the compiled f-string is one concatenation: with the
        # numbers as objects in it (or ``!s``) it was a str.format call, half of this
        # function's cost (about 14,000 instructions a line, python -m bench.instructions).
        n_in, n_out, code, ms = str(bytes_in), str(bytes_out), str(status), milliseconds(duration)
        return (
            f'{{"request_id":{_esc(request_id)}{who}{_esc(path)}{why}{n_in},'
            f'{streamed}"bytes_out":{n_out},"status":{code},'
            f'"duration_ms":{ms},"time":{_esc(time_)}}}\n'
        )

    def _who_run(self, key: tuple[str | None, str | None, str]) -> str:
        """From the pod to the path's opening quote: ``,"pod":..,"method":"POST","path":``."""
        account, upstream, method = key
        run = (f'{self._constant}{"null" if account is None else _esc(account)},'
               f'"upstream":{"null" if upstream is None else _esc(upstream)},"method":{_esc(method)},"path":')
        if len(self._who) >= _RUNS_KEPT:
            self._who.clear()
        self._who[key] = run
        return run

    def _why_run(self, key: tuple[str, str]) -> str:
        """From after the path to ``bytes_in``'s value: ``,"decision":..,"reason":..,"bytes_in":``."""
        decision, reason = key
        run = f',"decision":{_esc(decision)},"reason":{_esc(reason)},"bytes_in":'
        if len(self._why) >= _RUNS_KEPT:
            self._why.clear()
        self._why[key] = run
        return run


def duration_ms(seconds: float) -> float:
    """``seconds`` (at least 0) in milliseconds, to the microsecond: ``round(seconds * 1000, 3)``.

    ``round`` with digits rounds through the decimal digits (dtoa), 1,600 instructions a
    line; ``n / 1000`` is the double nearest to the decimal n/1000, the same value but for
    exact ties, which a clock's difference does not make.
    """
    return int(seconds * 1_000_000.0 + 0.5) / 1000


def milliseconds(ms: float) -> str:
    """``ms`` as JSON text that parses back to it: integer arithmetic when it has at most three
    decimals (every duration the sidecar writes is ``duration_ms``'s), else ``repr``.

    A float's shortest ``repr`` (dtoa) cost about 2,000 instructions a line. ``n / 1000`` is
    the double nearest to the decimal n/1000, as is ``float("q.rrr")``: equal to ``ms``, the
    text is exact.
    """
    if 0.0 <= ms < 1e12:
        n = int(ms * 1000.0 + 0.5)
        if n / 1000 == ms:
            return str(n // 1000) + "." + _THOUSANDTHS[n % 1000]
    return repr(ms)


#: ``000`` to ``999``: the digits after the point.
_THOUSANDTHS: Final = tuple(f"{m:03d}" for m in range(1000))


#: Runs kept per encoder at most (they are few: accounts x upstreams x methods); more and it starts over.
_RUNS_KEPT: Final = 512


#: The longest path an audit line holds.
PATH_KEPT: Final = 2048


def redacted(raw: str) -> str:
    """The request target for the audit line: query values are replaced."""
    path, sep, query = raw.partition("?")
    if not sep:
        return path[:PATH_KEPT]
    names = "&".join(f"{p.split('=', 1)[0]}=REDACTED" for p in query.split("&") if p)
    return f"{path}?{names}"[:PATH_KEPT]


class Stamp:
    """RFC 3339 UTC with milliseconds; ``strftime`` runs once a second, the text once a millisecond."""

    __slots__ = ("_last", "_milli", "_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._milli = -1
        self._text = ""
        self._last = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        milli = int((now - second) * 1000)
        if second == self._second:
            if milli == self._milli:
                return self._last  # under load many requests end within one millisecond
        else:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._last = text = self._text + _MILLIS[milli]
        return text


#: ``.000Z`` to ``.999Z``: a concatenation instead of a formatting per stamp.
_MILLIS: Final = tuple(f".{digits}Z" for digits in _THOUSANDTHS)
