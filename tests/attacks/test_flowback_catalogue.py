"""The key must not flow back: upstreams that echo the credential, for every auth type.

The upstream echoes what it received in an error body (streamed in 7-byte
chunks, so every form straddles chunk boundaries), in response headers
(``WWW-Authenticate`` too), and in a redirect ``Location`` (the classic
``query``-auth leak). The agent's whole answer, status line, headers and body,
must hold no form of the key: raw, URL-encoded or base64. The upstream must
really have received the key (else the test proves nothing), and the trap
named by the Location must see no request: redirects are passed back, not followed.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import html
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.attacks import leaks, world
from tests.attacks.world import World

pytestmark = pytest.mark.e2e

AUTH = {
    "bearer": ("bearer-leak", leaks.forms(world.KEYS["openai"])),
    "query": ("query-leak", leaks.forms(world.KEYS["query"])),
    "header": ("header-leak", leaks.forms(world.KEYS["header"])),
    "basic": ("basic-leak", leaks.basic_forms(world.KEYS["username"], world.KEYS["password"])),
    "oauth2": ("oauth-leak", leaks.forms(world.ACCESS_TOKEN) | leaks.forms(world.KEYS["client_secret"])),
}
ECHOES = {"body": 401, "header": 403, "location": 302, "reason": 401}


@pytest.mark.parametrize("echo", list(ECHOES))
@pytest.mark.parametrize("auth", list(AUTH))
def test_an_upstream_echo_of_the_key_never_reaches_the_agent(fresh: World, auth: str, echo: str) -> None:
    w = fresh
    route, forms = AUTH[auth]
    before = len(w.upstream.seen)
    answer = w.request(f"/{route}/leak/{echo}", w.token)
    assert answer.status == ECHOES[echo], answer.raw[:300]
    [seen] = [s for s in w.upstream.seen[before:] if s.raw_path != "/oauth/token"]
    sent = seen.raw_path.encode() + b"".join(f"{k}: {v}".encode() for k, v in seen.headers.items())
    assert leaks.find(sent, forms), "the upstream did not receive the key: the echo proves nothing"
    assert leaks.find(answer.raw, forms) == [], f"{auth}/{echo}: the key came back to the agent"
    if echo == "location":
        location = [line for line in answer.head.split(b"\r\n") if line.lower().startswith(b"location:")]
        assert location and f":{w.trap.port}/cb".encode() in location[0], "the redirect was not passed back"


@pytest.mark.parametrize("auth", list(AUTH))
def test_an_echo_in_a_compressed_error_page_never_reaches_the_agent(fresh: World, auth: str) -> None:
    """The agent chooses Accept-Encoding: asking for gzip must not hide the echo from the scrubber."""
    w = fresh
    route, forms = AUTH[auth]
    before = len(w.upstream.seen)
    answer = w.request(f"/{route}/leak/gzip", w.token, headers={"Accept-Encoding": "gzip"})
    assert answer.status == 401, answer.raw[:300]
    [seen] = [s for s in w.upstream.seen[before:] if s.raw_path != "/oauth/token"]
    sent = seen.raw_path.encode() + b"".join(f"{k}: {v}".encode() for k, v in seen.headers.items())
    assert leaks.find(sent, forms), "the upstream did not receive the key: the echo proves nothing"
    body = answer.body
    if b"content-encoding: gzip" in answer.head.lower():
        body = gzip.decompress(body)
    assert b"invalid key" in body
    assert leaks.find(answer.head + body, forms) == [], f"{auth}: the key came back to the agent, compressed"


def test_the_count_of_flowback_cases() -> None:
    assert len(AUTH) * len(ECHOES) == 20
    assert 2 * len(ECHO_STYLES) == 18


# --- echoes spelled by encoders, header names, transfer codings -------------------------------------
#
# An upstream of this module's own (raw sockets, so it can send any head) echoes the credential
# the way real frameworks write it: JSON with Go's or PHP's escapes, HTML entities,
# encodeURIComponent, a mix per character; as a header *name*; and under Transfer-Encoding
# "gzip, chunked". The keys hold the punctuation those encoders rewrite (/ + = & < > ! ' " ~).
# The expected spellings are written here from each encoder's rules, not from the scrubber.

PUNCT_KEYS = {"punct_bearer": "sk-CANARY&<x>!/+=9f2e'~(q)", "punct_password": "pw-CANARY&<b>!/+=\"x~*7d1c"}


def _go_json(s: str) -> str:
    return json.dumps(s)[1:-1].replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _php_json(s: str) -> str:
    return json.dumps(s)[1:-1].replace("/", "\\/").replace("<", "\\u003C").replace(">", "\\u003E").replace(
        "&", "\\u0026").replace("'", "\\u0027")


def _json_all(s: str) -> str:
    return "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in s)


def _html_hex(s: str) -> str:
    return "".join(c if c.isalnum() else f"&#x{ord(c):X};" for c in s)


def _mixed(s: str) -> str:  # a template's HTML escape over a library's JSON escape over a URL, per character
    spell = [lambda c: c, _json_all, _html_hex, lambda c: urllib.parse.quote(c, safe=""), html.escape]
    return "".join(spell[i % len(spell)](c) for i, c in enumerate(s))


SPELLINGS = {
    "json-go": _go_json, "json-php": _php_json, "json-all-escaped": _json_all, "html-escape": html.escape,
    "html-hex-references": _html_hex, "encodeURIComponent": lambda s: urllib.parse.quote(s, safe="-_.!~*'()"),
    "mixed-per-character": _mixed,
}


def _secrets(credential: str, basic: bool) -> list[str]:
    """What the upstream may echo: the credential, and for basic auth the password and the header value."""
    if not basic:
        return [credential]
    pair = credential
    return [pair, pair.split(":", 1)[1], "Basic " + base64.b64encode(pair.encode()).decode()]


class EchoUpstream:
    """Answers ``GET /leak/<style>`` by echoing the credential it received in that style."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # the credentials that arrived
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    more = conn.recv(65536)
                    if not more:
                        break
                    head += more
                self._answer(conn, head.decode("latin-1"))

    def _answer(self, conn: socket.socket, head: str) -> None:
        lines = head.split("\r\n")
        style = lines[0].split(" ")[1].rsplit("/", 1)[-1]
        auth = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("authorization:")), "")
        basic = auth.startswith("Basic ")
        credential = base64.b64decode(auth[6:]).decode() if basic else auth.removeprefix("Bearer ")
        self.seen.append(credential)
        secrets = _secrets(credential, basic)
        if style == "header-name":
            names = "".join(f"X-Echo-{urllib.parse.quote(s, safe='')}: 1\r\n" for s in secrets)
            conn.sendall(f"HTTP/1.1 403 Forbidden\r\n{names}Content-Length: 2\r\nConnection: close\r\n\r\nno".encode())
            return
        if style == "te-gzip-chunked":
            body = gzip.compress(f"invalid key {' '.join(secrets)}\n".encode())
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip, chunked\r\n"
                         b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        text = json.dumps({"error": "invalid key"})[:-1].encode() + b', "echo": "' + " ".join(
            SPELLINGS[style](s) for s in secrets).encode() + b'"}\n'
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        for i in range(0, len(text), 7):  # small chunks: every spelling straddles chunk boundaries
            conn.sendall(b"%x\r\n%s\r\n" % (len(text[i : i + 7]), text[i : i + 7]))
        conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._server.close()


@pytest.fixture(scope="module")
def echo(attack_world: World) -> Iterator[EchoUpstream]:
    """The echo upstream behind two routes of the attacker's policy set: bearer and basic."""
    w = attack_world
    up = EchoUpstream()
    cluster, ns = w.cluster, w.namespace
    cluster.kubectl("patch", "secret", world.SECRET_NAME, "-n", ns, "--type", "merge",
                    "-p", json.dumps({"stringData": PUNCT_KEYS}))
    allow = [{"methods": ["GET"], "paths": ["/leak/*"]}]
    upstreams = [
        {"name": "echo-bearer", "url": up.url, "insecure": True, "allow": allow,
         "auth": {"type": "bearer", "secretRef": {"name": world.SECRET_NAME, "key": "punct_bearer"}}},
        {"name": "echo-basic", "url": up.url, "insecure": True, "allow": allow,
         "auth": {"type": "basic", "secretRef": {"name": world.SECRET_NAME},
                  "basic": {"usernameKey": "username", "passwordKey": "punct_password"}}},
    ]
    world.apply(cluster, world.policy_manifest(ns, upstreams, name="echo-forms"))
    world.wait_until(lambda: w.request("/echo-basic/leak/json-go", w.token).status == 401, 15,
                     "the echo-forms policy to be routed")
    try:
        yield up
    finally:
        up.close()
        cluster.kubectl("delete", "agentpolicy", "echo-forms", "-n", ns, "--ignore-not-found")
        cluster.kubectl("patch", "secret", world.SECRET_NAME, "-n", ns, "--type", "merge",
                        "-p", json.dumps({"data": dict.fromkeys(PUNCT_KEYS)}))


def _echo_forms(secrets: list[str], style: str) -> set[bytes]:
    """Every form the echo took, and the plain ones, for each secret."""
    found: set[bytes] = set()
    for s in secrets:
        found |= leaks.forms(s)
        if style in SPELLINGS:
            found.add(SPELLINGS[style](s).encode())
        found.add(urllib.parse.quote(s, safe="").encode())
    return found


ECHO_STYLES = [*SPELLINGS, "header-name", "te-gzip-chunked"]


@pytest.mark.parametrize("style", ECHO_STYLES)
@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_a_spelled_echo_of_the_key_never_reaches_the_agent(
        fresh: World, echo: EchoUpstream, auth: str, style: str) -> None:
    w = fresh
    before = len(echo.seen)
    answer = w.request(f"/echo-{auth}/leak/{style}", w.token)
    [credential] = echo.seen[before:]
    basic = auth == "basic"
    expected_credential = (f"{world.KEYS['username']}:{PUNCT_KEYS['punct_password']}" if basic
                           else PUNCT_KEYS["punct_bearer"])
    assert credential == expected_credential, "the upstream did not receive the key: the echo proves nothing"
    forms = _echo_forms(_secrets(credential, basic), style)
    if basic:
        forms |= leaks.basic_forms(world.KEYS["username"], PUNCT_KEYS["punct_password"])
    body = answer.body
    with contextlib.suppress(OSError, EOFError, gzip.BadGzipFile):
        body = gzip.decompress(body)  # what the agent reads if the coding came through
    assert leaks.find(answer.head + body, forms) == [], f"{auth}/{style}: the key came back to the agent"
    if style == "te-gzip-chunked":
        assert answer.status == 502, answer.raw[:300]
    else:
        assert answer.status == (403 if style == "header-name" else 401), answer.raw[:300]
