"""Scrubbing the key from responses, whole and streamed across chunk boundaries."""

from __future__ import annotations

import base64
import random
import re
from urllib.parse import quote

import pytest

from sidekey.proxy import scrubbing

KEY = "sk-proj-AbC/123+xyz=="


def forms_of(key: str) -> list[bytes]:
    return [
        key.encode(),
        quote(key, safe="").encode(),
        re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(key, safe="")).encode(),
        base64.b64encode(key.encode()),
        base64.urlsafe_b64encode(key.encode()),
        base64.b64encode(b"Bearer " + key.encode()),
        base64.b64encode(b"user:" + key.encode()),
    ]


@pytest.mark.parametrize("form", forms_of(KEY))
def test_each_encoded_form_is_removed(form: bytes) -> None:
    s = scrubbing.Scrubber([KEY])
    out = s.scrub(b"before " + form + b" after")
    assert out.startswith(b"before ") and out.endswith(b" after")
    assert len(out) == len(form) + 13  # same length: Content-Length stays true
    core = form.rstrip(b"=")[3:-3]
    assert core not in out


def test_text_without_secrets_is_returned_as_is() -> None:
    s = scrubbing.Scrubber([KEY])
    data = b"nothing to see"
    assert s.scrub(data) is data
    assert s.scrub_text("plain") == "plain"


def test_header_values_are_scrubbed() -> None:
    s = scrubbing.Scrubber([KEY])
    location = f"https://x.example/cb?key={quote(KEY, safe='')}&a=1"
    cleaned = s.scrub_text(location)
    assert quote(KEY, safe="") not in cleaned and cleaned.endswith("&a=1")


def test_a_short_secret_is_scrubbed_raw_only() -> None:
    s = scrubbing.Scrubber(["abc"])
    assert s.scrub(b"xabcx YWJj") == b"x***x YWJj"


@pytest.mark.parametrize("seed", range(20))
def test_secrets_split_across_random_chunk_boundaries_never_get_through(seed: int) -> None:
    rng = random.Random(seed)
    body = b"".join(rng.choice([b"text ", b"\n", f + b" "]) for f in forms_of(KEY) for _ in range(3))
    body = b"start " + body + KEY.encode()  # one right at the end
    stream = scrubbing.Scrubber([KEY]).stream()
    out = b""
    i = 0
    while i < len(body):
        n = rng.randint(1, 12)
        out += stream.feed(body[i : i + n])
        i += n
    out += stream.flush()
    assert len(out) == len(body)
    for form in forms_of(KEY):
        assert form.rstrip(b"=")[3:-3] not in out
    assert out.startswith(b"start ")


def test_sse_events_are_not_held_back() -> None:
    stream = scrubbing.Scrubber([KEY]).stream()
    event = b'data: {"delta": "s"}\n\n'
    assert stream.feed(event) == event


def test_only_a_possible_secret_prefix_is_held_back() -> None:
    stream = scrubbing.Scrubber([KEY]).stream()
    assert stream.feed(b"hello sk-pr") == b"hello "
    assert stream.feed(b"ice list") == b"sk-price list"
    assert stream.flush() == b""


def test_a_held_back_tail_that_never_completes_is_flushed_at_the_end() -> None:
    stream = scrubbing.Scrubber([KEY]).stream()
    assert stream.feed(b"ends with sk-") == b"ends with "
    assert stream.flush() == b"sk-"


def test_an_empty_scrubber_is_free() -> None:
    s = scrubbing.Scrubber([])
    assert s.empty and s.held_back(b"abc") == 0
