"""The per-request shortcuts of the hot path give the answers the long way gives.

Each shortcut here (a header found by its usual spelling before it is
lowercased, the anchors searched by ``find`` past a size, the timestamp text
kept for a millisecond, the metric children kept per key) must serve exactly
what it replaces, whatever the spelling, size, time or label.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from bench.requestpath import CollectingTransport as _Sink
from sidekey.core import logs
from sidekey.proxy import audit, forwarding, listener, metrics, routes, scrubbing, upstream
from tests.proxy.fakes import agent_request

# --- header spellings -------------------------------------------------------------------------


def test_every_spelling_the_listener_knows_is_the_kind_of_its_lowercase() -> None:
    for name, (kind, spelled) in listener._KINDS.items():
        assert kind == listener._SPECIAL.get(name.lower(), listener._PLAIN), name
        assert spelled == name.decode("latin-1")  # the name as the agent wrote it
    for name in listener._SPECIAL:
        assert name == name.lower() and listener._KINDS[name][0] == listener._SPECIAL[name]


def test_every_spelling_the_upstream_side_knows_is_the_kind_of_its_lowercase() -> None:
    for name, kind in upstream._KINDS.items():
        assert kind == upstream._READ.get(name.lower(), upstream._PLAIN), name
    for name in upstream._READ:
        assert upstream._KINDS[name] == upstream._READ[name]


def _parsed(head: bytes) -> tuple[list[listener.Request], list[bytes]]:
    seen: list[listener.Request] = []

    def fast(request: listener.Request, conn: listener.AgentConnection) -> None:
        seen.append(request)
        return None

    async def handler(request: listener.Request, conn: listener.AgentConnection) -> None:
        conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def run() -> list[bytes]:
        server = listener.Listener(handler, fast)
        conn = listener.AgentConnection(handler, server, fast)
        sink = _Sink()
        conn.connection_made(sink)
        conn.data_received(head)
        await asyncio.sleep(0)
        return sink.out

    out = asyncio.run(run())
    return seen, out


@pytest.mark.parametrize("spell", [bytes.lower, bytes.title, bytes.upper, lambda n: n.swapcase().title().swapcase(),
                                   lambda n: bytes(c ^ 0x20 if i % 2 and 97 <= c <= 122 else c
                                                   for i, c in enumerate(n))])
def test_the_request_headers_are_read_alike_in_any_spelling(spell: Any) -> None:
    names = [b"host", b"authorization", b"x-api-key", b"content-length", b"connection", b"expect", b"content-type"]
    n = {name: spell(name) for name in names}
    head = (b"POST /a HTTP/1.1\r\n%s: h\r\n%s: Bearer tok\r\n%s: other\r\n%s: 2\r\n%s: x-trace\r\n"
            b"%s: 100-continue\r\n%s: text/plain\r\n\r\nhi" % tuple(n[name] for name in names))
    seen, _ = _parsed(head)
    [req] = seen
    assert (req.authorization, req.token_header, req.content_length) == ("Bearer tok", "other", 2)
    assert (req.connection, req.expect) == ("x-trace", "100-continue")
    assert [k for k, _ in req.headers] == [name.decode() for name in n.values()]  # as the agent wrote them


@pytest.mark.parametrize("host", [b"Host", b"HOST", b"host", b"hOsT"])
def test_a_second_host_is_refused_in_any_spelling(host: bytes) -> None:
    seen, out = _parsed(b"GET /a HTTP/1.1\r\nHost: a\r\n%s: b\r\n\r\n" % host)
    assert not seen and out and out[0].startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("name", [b"Transfer-Encoding", b"TRANSFER-ENCODING", b"transfer-encoding", b"tRaNsFeR-eNcOdInG"])
def test_a_transfer_coding_other_than_chunked_is_refused_in_any_spelling(name: bytes) -> None:
    seen, out = _parsed(b"POST /a HTTP/1.1\r\nHost: a\r\n%s: gzip, chunked\r\n\r\n" % name)
    assert not seen and out and out[0].startswith(b"HTTP/1.1 400 ")


def _pool() -> upstream.Pool:
    return upstream.Pool(routes.GuardedResolver(frozenset()))


@pytest.mark.parametrize("spell", [bytes.lower, bytes.title, bytes.upper, lambda n: n.swapcase().title().swapcase()])
def test_the_response_headers_are_read_alike_in_any_spelling(spell: Any) -> None:
    async def run() -> upstream.UpstreamConnection:
        up = upstream.UpstreamConnection(_pool(), ("http", "h", 80, None))
        up.connection_made(_Sink())
        up.send(b"GET / HTTP/1.1\r\n\r\n", head_method=False, timeout=5)
        got: list[bytes] = []
        up.set_sink(got.append)
        up.data_received(b"HTTP/1.1 200 OK\r\n%s: 5\r\n%s: gzip\r\n%s: x\r\n\r\nhello" % (
            spell(b"content-length"), spell(b"content-encoding"), spell(b"server")))
        assert got == [b"hello"]
        return up

    up = asyncio.run(run())
    assert (up.status, up.content_length, up.codings, up.complete) == (200, 5, [b"gzip"], True)
    # the length is the sidecar's to write; the coding goes too when the sidecar decodes the body
    assert up.header_block(decoded=False) == b"%s: gzip\r\n%s: x\r\n" % (spell(b"content-encoding"), spell(b"server"))
    assert up.header_block(decoded=True) == b"%s: x\r\n" % spell(b"server")


@pytest.mark.parametrize("name", [b"Transfer-Encoding", b"TRANSFER-ENCODING", b"tRaNsFeR-eNcOdInG"])
def test_an_upstream_transfer_coding_other_than_chunked_is_refused_in_any_spelling(name: bytes) -> None:
    failed: list[upstream.UpstreamError] = []

    class Watcher:
        def head_ready(self) -> None: ...
        def fed(self) -> None: ...
        def done(self) -> None: ...

        def failed(self, exc: upstream.UpstreamError) -> None:
            failed.append(exc)

    async def run() -> None:
        up = upstream.UpstreamConnection(_pool(), ("http", "h", 80, None))
        up.connection_made(_Sink())
        up.send(b"GET / HTTP/1.1\r\n\r\n", head_method=False, timeout=5, watcher=Watcher())
        up.data_received(b"HTTP/1.1 200 OK\r\n%s: gzip\r\n\r\n" % name)

    asyncio.run(run())
    assert len(failed) == 1 and isinstance(failed[0], upstream.Unacceptable)


# --- the anchor search, at sizes from a header to a large body --------------------------------

KEY = "sk-live-0123456789abcdefABCDEF"


@pytest.mark.parametrize("size", [10, 84, 150, 600, 5000])  # a short value, a header block, an SSE event, bodies
def test_the_key_is_found_in_a_chunk_of_any_size_and_nothing_else(size: int) -> None:
    s = scrubbing.Scrubber([KEY])
    import base64
    for form in (KEY.encode(), base64.b64encode(KEY.encode())):
        filler = b"x" * max(0, size - len(form))
        for data in (form + filler, filler + form, filler[: len(filler) // 2] + form + filler[len(filler) // 2:]):
            assert s._maybe(data)
            cleaned = s.scrub(data)
            assert form not in cleaned and len(cleaned) == len(data)
        clean = b"y" * size
        assert not s._maybe(clean) and s.scrub(clean) is clean


# --- the timestamp text, kept for a millisecond ------------------------------------------


def test_the_stamp_is_the_time_to_the_millisecond_whenever_it_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    times = iter([1_800_000_000.0001, 1_800_000_000.0009, 1_800_000_000.0012, 1_800_000_000.9999,
                  1_800_000_001.0004, 1_800_000_001.0004, 1_800_000_061.5, 1_800_000_001.0004])
    monkeypatch.setattr(time, "time", lambda: next(times))
    stamp = audit.Stamp()
    got = [stamp.now() for _ in range(8)]
    assert got == ["2027-01-15T08:00:00.000Z", "2027-01-15T08:00:00.000Z", "2027-01-15T08:00:00.001Z",
                   "2027-01-15T08:00:00.999Z", "2027-01-15T08:00:01.000Z", "2027-01-15T08:00:01.000Z",
                   "2027-01-15T08:01:01.500Z", "2027-01-15T08:00:01.000Z"]


# --- the metric children, kept per key ---------------------------------------------------


def _value(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_request_is_counted_under_its_own_labels_and_timed_under_its_upstream() -> None:
    async def run() -> list[dict[str, Any]]:
        out = io.StringIO()
        proxy = forwarding.Proxy(table=dict, validator=lambda: None, ready=lambda: True,
                                 audit=logs.AuditWriter(out), pod="p", namespace="n")
        cases = [("lean-a", "POST", 200, "allowed"), ("lean-b", "POST", 200, "allowed"),
                 ("lean-a", "GET", 200, "allowed"), ("lean-a", "POST", 502, "allowed"),
                 ("lean-a", "POST", 200, "allowed"), (None, "POST", 401, None)]
        before = {c: _value("sidekey_requests_total", _labels(c)) for c in set(cases)}
        timed = {u: _value("sidekey_request_duration_seconds_count", {"upstream": u}) for u in ("lean-a", "lean-b")}
        for name, method, status, decided in cases:
            request, _, _ = agent_request(method)
            record: audit.AuditRecord = {"request_id": "r", "pod": "p", "namespace": "n", "service_account": None,
                                         "upstream": name, "method": method, "path": "/x"}
            if decided is not None:
                record["decision"] = decided
            proxy.in_flight += 1
            proxy.finish(request, record, 0.0, status)
        for case in set(cases):
            assert _value("sidekey_requests_total", _labels(case)) - before[case] == cases.count(case), case
        assert _value("sidekey_request_duration_seconds_count", {"upstream": "lean-a"}) - timed["lean-a"] == 4
        assert _value("sidekey_request_duration_seconds_count", {"upstream": "lean-b"}) - timed["lean-b"] == 1
        proxy._audit.flush()
        await proxy.close()
        return [json.loads(line) for line in out.getvalue().splitlines()]

    lines = asyncio.run(run())
    assert [line["status"] for line in lines] == [200, 200, 200, 502, 200, 401]


def _labels(case: tuple[str | None, str, int, str | None]) -> dict[str, str]:
    name, method, status, decided = case
    return {"upstream": name or "", "method": method, "code": str(status), "decision": decided or "error"}


# --- the audit line's kept runs -------------------------------------------------------------


def test_each_audit_line_holds_its_own_record_whatever_lines_came_before() -> None:
    base: dict[str, Any] = {
        "request_id": "b-1", "pod": "p", "namespace": "n", "service_account": "agent", "upstream": "openai",
        "method": "POST", "path": "/openai/v1", "decision": "allowed", "reason": "ok", "bytes_in": 1,
        "bytes_out": 2, "status": 200, "duration_ms": 0.5, "time": "2026-12-01T22:00:00.123Z",
    }
    variants = [{}, {"service_account": None}, {"upstream": None}, {"service_account": "other", "upstream": "b"},
                {"method": "GET"}, {"method": 'WE"RD'}, {"decision": "denied", "reason": "not_allowed"},
                {"reason": "upstream_timeout"}, {"decision": "error", "reason": "ok"}, {"streamed": True},
                {"upstream": "openai\u2028x"}]
    encoder = audit.LineEncoder("p", "n")
    for round_ in range(3):
        for i, change in enumerate(variants * 2 if round_ else variants):
            record = {**base, **change, "request_id": f"b-{round_}-{i}", "bytes_in": i}
            line = encoder.encode(record)  # type: ignore[arg-type]
            assert line is not None and json.loads(line) == record
    for i in range(audit._RUNS_KEPT + 5):  # past the bound: it starts over and stays right
        record = {**base, "upstream": f"u{i}", "reason": f"r{i}"}
        line = encoder.encode(record)  # type: ignore[arg-type]
        assert line is not None and json.loads(line) == record
    assert len(encoder._who) <= audit._RUNS_KEPT and len(encoder._why) <= audit._RUNS_KEPT


# --- the agent's header lines, in one pass ------------------------------------------------


@pytest.mark.parametrize("connection", [None, "", "x-trace, Keep-Alive", " X-TRACE ,upgrade"])
def test_the_forwarded_lines_are_the_forwarded_headers(connection: str | None) -> None:
    from sidekey.proxy import headers
    items = [("Host", "h"), ("Authorization", "Bearer t"), ("X-Api-Key", "k"), ("Content-Length", "3"),
             ("X-Trace", "1"), ("x-trace", "2"), ("Keep-Alive", "5"), ("Upgrade", "h2c"), ("Accept", "*/*"),
             ("X-HTTP-Method-Override", "DELETE"), ("Content-Type", "a/b")]
    strip = frozenset({"authorization", "x-api-key", "x-http-method-override", "host"})
    other = frozenset({"accept", "x-trace"})  # another route's: what it keeps and drops differs
    for _ in range(2):  # the second time from the kept answers
        for s in (strip, other):
            lines = headers.forward_lines(items, connection, s)
            assert lines == "".join(f"{k}: {v}\r\n" for k, v in headers.forward(items, connection, s))
    assert "Authorization" in lines and "Accept" not in lines
    lines = headers.forward_lines(items, connection, strip)
    assert "Authorization" not in lines and "Content-Length" not in lines and "Accept: */*\r\n" in lines


def test_the_forwarded_lines_stay_right_past_the_bound_of_names_kept() -> None:
    from sidekey.proxy import headers
    strip = frozenset({"authorization", "x-drop-1"})
    items = [(f"X-Drop-{i}" if i % 2 else f"X-Keep-{i}", "v") for i in range(headers._KEPT_NAMES * 2)]
    items += [("AUTHORIZATION", "Bearer t"), ("X-DROP-1", "z")]
    lines = headers.forward_lines(items, None, strip)
    assert lines == "".join(f"{k}: {v}\r\n" for k, v in headers.forward(items, None, strip))
    assert "AUTHORIZATION" not in lines and "X-DROP-1:" not in lines and "X-Drop-3: v" in lines


# --- the relay's scrubbing and the histogram's bucket ------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_the_relay_scrubs_any_chunking_as_the_stream_scrubber_does(seed: int) -> None:
    import base64
    import random

    from sidekey.proxy import relaying
    rng = random.Random(seed)
    s = scrubbing.Scrubber([KEY])
    body = b"".join(rng.choice([b"data: x\n\n", KEY.encode(), base64.b64encode(KEY.encode()), b"sk-live-01",
                                b"abc", KEY.encode()[: rng.randrange(1, len(KEY))]]) for _ in range(30))
    cuts = sorted(rng.sample(range(1, len(body)), rng.randrange(1, 12)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    request, conn, sink = agent_request()
    reply = listener.Reply(conn, request)
    reply.uncork()  # not started: the body's bytes reach the transport as written
    relay = relaying.Relay(reply, s, None, [], sse=True)
    stream = s.stream()
    expected: list[bytes] = []
    for chunk in chunks:
        relay.feed(chunk)
        expected.append(stream.feed(chunk))
        assert b"".join(sink.out) == b"".join(expected)  # the same bytes released, chunk by chunk
    relay.finish()
    expected.append(stream.flush())
    assert b"".join(sink.out) == b"".join(expected) == s.scrub(body)
    assert KEY.encode() not in b"".join(sink.out)


def test_an_observation_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    from sidekey.proxy import metrictypes
    bounds = (0.001, 0.005, 0.5, 1.0, float("inf"))
    h = metrictypes.HistogramValue(bounds)
    for value in (0.0, 0.001, 0.0010001, 0.005, 0.3, 1.0, 2.0, float("inf"), -1.0, float("nan")):
        h.observe(value)
    assert list(h.counts) == [3, 2, 1, 1, 2]  # bounds inclusive; NaN in none
    capped = metrictypes.HistogramValue((1.0, 2.0))  # a bound list without +Inf: beyond it, no bucket
    capped.observe(3.0)
    capped.observe(2.0)
    assert list(capped.counts) == [0, 1]


@pytest.mark.parametrize("swap", ["bytes_in", "time", "request_id", "reason", "service_account"])
def test_a_record_of_the_common_size_but_another_shape_is_left_to_json(swap: str) -> None:
    record: dict[str, Any] = {
        "request_id": "b-1", "pod": "p", "namespace": "n", "service_account": "agent", "upstream": "openai",
        "method": "POST", "path": "/openai/v1", "decision": "allowed", "reason": "ok", "bytes_in": 1,
        "bytes_out": 2, "status": 200, "duration_ms": 0.5, "time": "2026-12-01T22:00:00.123Z",
    }
    encoder = audit.LineEncoder("p", "n")
    assert encoder.encode(record) is not None  # type: ignore[arg-type]
    value = record.pop(swap)
    record["model"] = value  # 14 entries, one of them not the common line's
    assert encoder.encode(record) is None  # type: ignore[arg-type]
    record[swap] = value  # 15 entries without "streamed"
    assert encoder.encode(record) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("target", ["/openai/v1/chat", "/a?key=sk-secret&x=1", "/a?", "/" + "p" * 2047,
                                    "/" + "p" * 2048, "/" + "p" * 3000, "/b?" + "q" * 3000])
def test_the_audited_path_is_the_redacted_target(target: str) -> None:
    async def run() -> str:
        out = io.StringIO()
        proxy = forwarding.Proxy(table=dict, validator=lambda: None, ready=lambda: True,
                                 audit=logs.AuditWriter(out), pod="p", namespace="n")
        request, conn, _ = agent_request("GET", target)
        _, record, _ = proxy._begin(request, conn)
        await proxy.close()
        return str(record["path"])

    path = asyncio.run(run())
    assert path == audit.redacted(target) and len(path) <= audit.PATH_KEPT and "sk-secret" not in path
