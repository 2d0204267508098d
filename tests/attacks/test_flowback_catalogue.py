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

import gzip

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
