"""The validator's one-pass path decides every token as joserfc's ``deserialize_compact`` did.

``tokens.Validator`` splits a token once, decodes each segment once, remembers
checked headers and calls joserfc's algorithm object (``check_key``,
``verify``) itself instead of ``jws.deserialize_compact``. The oracle here is
the path it replaced, kept verbatim: the header read leniently, then joserfc's
full ``deserialize_compact`` (its size limits, strict base64url, header rules
and key checks), then the payload read again. Every token, well formed or
mangled, must get the same outcome from both: the same identity, or a refusal
with the same reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import string
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import errors as jose_errors
from joserfc import jwk, jws
from joserfc.util import urlsafe_b64decode

from sidekey.core import tokens
from tests.core.test_tokens import BINDING, EC, RSA, RSA_2, Clock, Fetcher, b64, claims

#: Keys that make joserfc's own key checks matter: no ``alg`` on a P-384 key (only its curve
#: tells it is no ES256 key), and a key whose ``key_ops`` forbid verifying.
EC_384 = jwk.ECKey.generate_key("P-384", parameters={"kid": "ec-384"})
NO_VERIFY = jwk.RSAKey.generate_key(2048, parameters={"kid": "no-verify", "key_ops": ["sign"]})
NO_ALG = jwk.RSAKey.generate_key(2048, parameters={"kid": "no-alg"})
KEYS = (RSA, EC, EC_384, NO_VERIFY, NO_ALG)


def validator() -> tokens.Validator:
    keys = tokens.KeySet(Fetcher(*KEYS), clock=Clock())  # a still clock: an unknown kid never refetches
    asyncio.run(keys.refresh())
    return tokens.Validator(keys, BINDING, clock=Clock())


def reference(v: tokens.Validator, token: str) -> tokens.Identity:
    """The validation before the one-pass path (its ``_header`` and ``check``), as the oracle."""
    if not token:
        raise tokens.TokenError("missing", "")
    if len(token) > tokens.MAX_TOKEN_BYTES or not token.isascii():
        raise tokens.TokenError("malformed", "")
    parts = token.split(".")
    if len(parts) != 3:
        raise tokens.TokenError("malformed", "")
    header = tokens._b64json(parts[0], "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in tokens.ALLOWED_ALGORITHMS:
        raise tokens.TokenError("bad_algorithm", "")
    if "crit" in header or "b64" in header:
        raise tokens.TokenError("malformed", "")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise tokens.TokenError("unknown_kid", "")
    key = v.keys.keys.get(kid)
    if key is None:
        raise tokens.TokenError("unknown_kid", "")
    key_alg = key.get("alg")
    if key.key_type != tokens._KTY_FOR_ALG[alg[:2]] or (key_alg and key_alg != alg):
        raise tokens.TokenError("bad_algorithm", "")
    try:
        # joserfc's own import of the same JWK: the oracle shares nothing with the code under test
        jws.deserialize_compact(token, jwk.import_key(dict(key.document)), algorithms=[alg])
    except jose_errors.BadSignatureError:
        raise tokens.TokenError("bad_signature", "") from None
    except (jose_errors.JoseError, ValueError, TypeError):
        raise tokens.TokenError("malformed", "") from None
    return v.check_claims(tokens._b64json(parts[1], "payload"))


def outcome(run: Any) -> object:
    try:
        return run()
    except tokens.TokenError as exc:
        return exc.reason


def fast(v: tokens.Validator, token: str) -> tokens.Identity:
    """The validator's own path, synchronously (the key is known: it never awaits)."""
    coro = v.validate(token)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("validate awaited: an unknown kid should be refused before that")


def same(token: str, v: tokens.Validator | None = None) -> object:
    v = v or validator()
    expected = outcome(lambda: reference(v, token))
    v._cache.clear()
    got = outcome(lambda: fast(v, token))
    assert got == expected, (token[:120], got, expected)
    v._cache.clear()
    assert outcome(lambda: fast(v, token)) == expected  # a remembered header decides alike
    return got


def signed(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, key: jwk.Key = RSA,
           alg: str = "RS256") -> str:
    """A token over exactly these bytes, signed by joserfc's algorithm (any header joserfc would refuse)."""
    head = b64(header if isinstance(header, bytes) else json.dumps(dict(header)).encode())
    body = b64(payload if isinstance(payload, bytes) else json.dumps(dict(payload)).encode())
    signature = jws.JWSRegistry.algorithms[alg].sign(f"{head}.{body}".encode(), key)
    return f"{head}.{body}.{b64(signature)}"


def good(**header: Any) -> str:
    return signed({"alg": "RS256", "kid": "rsa-1", **header}, claims())


def test_a_good_token_gives_the_same_identity() -> None:
    identity = same(good())
    assert isinstance(identity, tokens.Identity) and identity.pod_uid == "uid-0"
    assert isinstance(same(signed({"alg": "ES256", "kid": "ec-1"}, claims(), EC, "ES256")), tokens.Identity)


HEADERS: list[dict[str, Any]] = [
    {"typ": "JWT"},
    {"typ": 7},
    {"cty": ["x"]},
    {"x5t": "abc"},
    {"x5t#S256": 1},
    {"x5c": ["MIIB"]},
    {"x5c": "MIIB"},
    {"jku": "https://attacker.example/jwks"},
    {"jku": 5},
    {"x5u": "not a url"},
    {"jwk": {"kty": "RSA"}},
    {"jwk": "x"},
    {"unregistered": 1},
    {"kid": 1},
    {"kid": ""},
    {"kid": "no-such-key"},
    {"kid": "x" * 600},
    {"zip": "DEF"},
    {"enc": "A256GCM"},
]


@pytest.mark.parametrize("extra", HEADERS, ids=[json.dumps(h)[:40] for h in HEADERS])
def test_header_members_are_decided_as_joserfc_decided_them(extra: dict[str, Any]) -> None:
    same(good(**extra))


@pytest.mark.parametrize(
    ("kid", "alg", "key", "expected"),
    [
        ("ec-384", "ES256", EC_384, "malformed"),  # no alg on the key: joserfc's curve check refuses it
        ("ec-384", "ES384", EC_384, "accepted"),
        ("no-verify", "RS256", NO_VERIFY, "malformed"),  # key_ops without verify
        ("no-alg", "RS256", NO_ALG, "accepted"),
        ("no-alg", "PS256", NO_ALG, "accepted"),
        ("no-alg", "RS512", NO_ALG, "accepted"),
        ("rsa-1", "PS256", RSA, "bad_algorithm"),
        ("ec-1", "ES384", EC, "bad_algorithm"),
    ],
)
def test_joserfcs_key_checks_still_apply(kid: str, alg: str, key: jwk.Key, expected: str) -> None:
    got = same(signed({"alg": alg, "kid": kid}, claims(), key, alg))
    assert ("accepted" if isinstance(got, tokens.Identity) else got) == expected


def test_a_header_over_joserfcs_size_limit_is_refused_as_before() -> None:
    token = good(typ="J" * 500)
    assert len(token.split(".")[0]) > 512
    assert same(token) == "malformed"


def test_a_signature_over_joserfcs_size_limit_is_refused_as_before() -> None:
    h, p, s = good().split(".")
    assert same(f"{h}.{p}.{s + 'A' * 800}") in {"malformed", "bad_signature"}


def _reencode(segment: str, how: str) -> str:
    raw = urlsafe_b64decode(segment.encode())
    if how == "padded":
        return base64.urlsafe_b64encode(raw).decode()
    if how == "standard":
        return base64.b64encode(raw).decode().rstrip("=")
    if how == "stray":
        return segment[:5] + "!" + segment[5:]
    if how == "space":
        return segment[:5] + " " + segment[5:]
    raise AssertionError(how)


@pytest.mark.parametrize("part", [0, 1, 2])
@pytest.mark.parametrize("how", ["padded", "standard", "stray", "space"])
def test_non_canonical_base64url_in_any_segment_is_decided_as_before(part: int, how: str) -> None:
    for token in (good(), good(typ="JWT?>>")):  # the second has '+'/'/' in its standard encoding
        parts = token.split(".")
        parts[part] = _reencode(parts[part], how)
        same(".".join(parts))


ALPHABET = string.ascii_letters + string.digits + "-_"


def _non_canonical_ending(segment: str) -> str | None:
    """The same segment with the last letter's unused bits set, if it has any."""
    if len(segment) % 4 in (2, 3):
        for letter in ALPHABET:
            candidate = segment[:-1] + letter
            if letter != segment[-1] and _decodes_loosely_to(candidate, segment):
                return candidate
    return None


def _decodes_loosely_to(candidate: str, segment: str) -> bool:
    def loose(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    return loose(candidate) == loose(segment)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_non_canonical_last_letter_is_decided_as_before(part: int) -> None:
    found = 0
    for n in range(4):  # segment lengths of every residue, so some leave unused bits
        parts = signed({"alg": "RS256", "kid": "rsa-1", "typ": "t" * n}, claims(jti="j" * n)).split(".")
        changed = _non_canonical_ending(parts[part])
        if changed is not None:
            parts[part] = changed
            found += 1
            # joserfc refuses the spelling itself: a header or payload spelt so is malformed
            assert same(".".join(parts)) == ("bad_signature" if part == 2 else "malformed")
    assert found, "no segment length with unused bits was tried"


@pytest.mark.parametrize(
    "token",
    [
        "", ".", "..", "a.b.c", "e30.e30.", "e30.e30.e30", "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIn0..",
        "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYS0xIn0.e30.AA",
    ],
)
def test_short_and_empty_segments_are_decided_as_before(token: str) -> None:
    same(token)


def test_payloads_joserfc_signs_but_the_claims_refuse_are_decided_as_before() -> None:
    header = {"alg": "RS256", "kid": "rsa-1"}
    for payload in (b"", b"[]", b"{", b'{"a":1,"a":2}', b'{"exp":NaN}', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00",
                    json.dumps(claims()).encode("utf-16"), b"{" * 3000, b'{"iss":"\xed\xa0\x80"}'):
        same(signed(header, payload))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mangled_token_is_decided_as_before(data: st.DataObject) -> None:
    token = data.draw(st.sampled_from([good(), good(typ="JWT"),
                                       signed({"alg": "ES256", "kid": "ec-1"}, claims(), EC, "ES256")]))
    chars = list(token)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(chars) - 1))
        op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        letter = data.draw(st.sampled_from(ALPHABET + "=+/. !"))
        if op == "replace":
            chars[at] = letter
        elif op == "insert":
            chars.insert(at, letter)
        elif len(chars) > 1:
            del chars[at]
    same("".join(chars))


def test_a_remembered_header_is_still_checked_against_the_key_of_each_token() -> None:
    """The header memo holds what the header says, never which key signed: a second token with
    the same header and a foreign signature is refused."""
    v = validator()
    assert isinstance(same(good(), v), tokens.Identity)
    foreign = signed({"alg": "RS256", "kid": "rsa-1"}, claims(), RSA_2)
    assert foreign.split(".")[0] == good().split(".")[0]
    assert same(foreign, v) == "bad_signature"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=ALPHABET + "=+/!. ", max_size=12) | st.text(alphabet=ALPHABET, min_size=1, max_size=40))
def test_segments_are_decoded_as_joserfc_decodes_them(segment: str) -> None:
    def decode(fn: Any) -> object:
        try:
            return fn()
        except ValueError:  # binascii.Error is one
            return "refused"
    assert decode(lambda: tokens._b64decode(segment)) == decode(lambda: urlsafe_b64decode(segment.encode()))
