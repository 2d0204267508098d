"""``core/tokens`` without joserfc decides every JWK and every token as joserfc does.

The validator imports JWKs and verifies signatures with ``cryptography``
directly, and carries joserfc's header names, size limits, JWK member rules
and key checks as its own tables. joserfc stays the reference: here each
table is compared with the registry it was copied from, each odd JWK is
imported by both (the same keys refused, the same public numbers and key
checks for the rest), and tokens of every allowed algorithm, of odd keys and
of sizes at and just over joserfc's limits are decided by both as
tests/core/test_tokens_joserfc_parity.py decides them (``same``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import errors as jose_errors
from joserfc import jwk
from joserfc.jws import JWSRegistry
from joserfc.registry import JWK_PARAMETER_REGISTRY, JWS_HEADER_REGISTRY
from joserfc.util import base64_to_int

from sidekey.core import tokens
from tests.core.test_tokens import BINDING, Clock, b64, claims
from tests.core.test_tokens_joserfc_parity import same, signed

RSA_KEY = jwk.RSAKey.generate_key(2048)
RSA_1024 = jwk.RSAKey.generate_key(1024)  # joserfc only warns below 2048 bits: accepted, as before
EC_256 = jwk.ECKey.generate_key("P-256")
EC_384 = jwk.ECKey.generate_key("P-384")
EC_521 = jwk.ECKey.generate_key("P-521")
OTHER_EC_256 = jwk.ECKey.generate_key("P-256")
OTHER_RSA = jwk.RSAKey.generate_key(2048)

#: Values of every JSON type and of the shapes the rules tell apart.
VALUES: list[Any] = [
    None, True, False, 0, 5, 1.5, "", "x", "sig", "enc", "sign", "verify", "verifyx", "http://a", "https://a",
    "ftp://a", "P-256", "P-384", "P-521", "P-192", [], ["a"], ["a", 1], ["sig"], ["verify"], ["sign"],
    ["sign", "verify"], ["encrypt"], ["verify", "bogus"], [["verify"]], {}, {"kty": "RSA"},
]


def public(key: jwk.Key, **members: Any) -> dict[str, Any]:
    """The key's public JWK with ``members`` set (``None`` removes one)."""
    document: dict[str, Any] = {**key.as_dict(private=False), **members}
    return {k: v for k, v in document.items() if v is not None}


def validator_of(*documents: Mapping[str, Any]) -> tokens.Validator:
    async def fetch() -> Mapping[str, Any]:
        return {"keys": list(documents)}
    keys = tokens.KeySet(fetch, clock=Clock())  # a still clock: an unknown kid never refetches
    asyncio.run(keys.refresh())
    return tokens.Validator(keys, BINDING, clock=Clock())


# --- the tables against joserfc's registries ---------------------------------------------------------


def _joserfc_accepts(validate: Any, value: Any) -> bool:
    try:
        validate(value)
    except ValueError:
        return False
    return True


def test_the_header_table_is_joserfcs_registry() -> None:
    assert set(tokens._JWS_HEADER_MEMBERS) == set(JWS_HEADER_REGISTRY)
    for name, parameter in JWS_HEADER_REGISTRY.items():
        for value in VALUES:
            assert tokens._JWS_HEADER_MEMBERS[name](value) == _joserfc_accepts(parameter.validate, value), (name, value)


def test_the_size_limits_are_joserfcs() -> None:
    ours = (tokens._MAX_HEADER_SEGMENT, tokens._MAX_PAYLOAD_SEGMENT, tokens._MAX_SIGNATURE_SEGMENT)
    assert ours == (JWSRegistry.max_header_length, JWSRegistry.max_payload_length, JWSRegistry.max_signature_length)


@pytest.mark.parametrize(("kty", "key_class"), [("RSA", jwk.RSAKey), ("EC", jwk.ECKey)])
def test_the_jwk_member_tables_are_joserfcs_registries(kty: str, key_class: Any) -> None:
    ours = {**tokens._JWK_MEMBERS, **tokens._KEY_TYPE_MEMBERS[kty]}
    theirs = {**JWK_PARAMETER_REGISTRY, **key_class.value_registry}
    assert set(ours) == set(theirs)
    for name, parameter in theirs.items():
        required, valid = ours[name]
        assert required == parameter.required, name
        for value in VALUES:
            assert valid(value) == _joserfc_accepts(parameter.validate, value), (name, value)
    private = {name for name, p in key_class.value_registry.items() if p.private}
    assert private <= tokens._PRIVATE_MEMBERS


def test_every_allowed_algorithm_has_a_scheme_of_joserfcs_key_type_and_curve() -> None:
    assert set(tokens._ALGORITHMS) == tokens.ALLOWED_ALGORITHMS
    for name, scheme in tokens._ALGORITHMS.items():
        theirs = JWSRegistry.algorithms[name]
        assert scheme.name == name and tokens._KTY_FOR_ALG[name[:2]] == theirs.key_type
        assert scheme.curve == getattr(theirs, "curve", None)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ é", max_size=12))
def test_jwk_numbers_are_decoded_as_joserfc_decodes_them(text: str) -> None:
    def decode(fn: Any) -> object:
        try:
            return fn(text)
        except ValueError:
            return "refused"
    assert decode(tokens._b64int) == decode(base64_to_int)


# --- JWK import against joserfc's jwk.import_key ------------------------------------------------------


def _theirs(document: Mapping[str, Any]) -> jwk.Key | None:
    try:
        return jwk.import_key(dict(document))  # type: ignore[arg-type]
    except (jose_errors.JoseError, ValueError, TypeError, KeyError):  # KeyError: a crv it does not know
        return None


def _ours(document: Mapping[str, Any]) -> tokens.PublicKey | None:
    try:
        return tokens.import_jwk(dict(document))
    except (ValueError, TypeError):
        return None


def _allows(check: Any, *args: str) -> bool:
    try:
        check(*args)
    except jose_errors.JoseError:
        return False
    return True


def imported_alike(document: Mapping[str, Any]) -> bool:
    """Both refuse the JWK, or both import the same public key with the same key checks."""
    theirs, ours = _theirs(document), _ours(document)
    assert (theirs is None) == (ours is None), (document, theirs, ours)
    if theirs is None or ours is None:
        return False
    # the key OpenSSL parsed is the SubjectPublicKeyInfo cryptography writes for joserfc's public key
    assert ours.public.der == theirs.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert ours.key_type == theirs.key_type
    assert ours.alg == (theirs.get("alg") or "")
    assert ours.curve == (theirs.curve_name if isinstance(theirs, jwk.ECKey) else None)
    assert ours.signs == _allows(theirs.check_use, "sig")
    assert ours.may_verify == _allows(theirs.check_key_op, "verify")
    return True


def _b64_of(number: int, length: int | None = None) -> str:
    return b64(number.to_bytes(length or (number.bit_length() + 7) // 8, "big"))


def _odd_documents() -> list[tuple[str, dict[str, Any]]]:
    rsa_numbers = RSA_KEY.public_key.public_numbers()
    ec_numbers = EC_256.public_key.public_numbers()
    n, e = RSA_KEY.as_dict()["n"], RSA_KEY.as_dict()["e"]
    rsa_private = RSA_KEY.as_dict(private=True)
    return [
        ("rsa", public(RSA_KEY)),
        ("rsa-1024", public(RSA_1024)),
        ("ec-256", public(EC_256)), ("ec-384", public(EC_384)), ("ec-521", public(EC_521)),
        ("n padded", public(RSA_KEY, n=n + "=" * (-len(n) % 4))),
        ("n standard alphabet", public(RSA_KEY, n=base64.b64encode(base64.urlsafe_b64decode(n + "==")).decode())),
        ("n empty", public(RSA_KEY, n="")),
        ("n a number", public(RSA_KEY, n=rsa_numbers.n)),
        ("n with a leading zero byte", public(RSA_KEY, n=b64(b"\0" + rsa_numbers.n.to_bytes(256, "big")))),
        ("e even", public(RSA_KEY, e=_b64_of(65536))),
        ("e non-canonical ending", public(RSA_KEY, e=e[:-1] + "C")),
        ("e missing", public(RSA_KEY, e=None)),
        ("x with a leading zero byte", public(EC_256, x=b64(b"\0" + ec_numbers.x.to_bytes(32, "big")))),
        ("x off the curve", public(EC_256, x=_b64_of(ec_numbers.x ^ 1, 32))),
        ("x of another key", public(EC_256, x=OTHER_EC_256.as_dict()["x"])),
        ("crv P-192", public(EC_256, crv="P-192")),
        ("crv of another size", public(EC_256, crv="P-384")),
        ("crv missing", public(EC_256, crv=None)),
        ("rsa with an ec kty", public(RSA_KEY, kty="EC")),
        ("alg not a string", public(RSA_KEY, alg=256)),
        ("alg empty", public(RSA_KEY, alg="")),
        ("use enc", public(RSA_KEY, use="enc")),
        ("use a list", public(RSA_KEY, use=["sig"])),
        ("use bogus", public(RSA_KEY, use="bogus")),
        ("key_ops verify", public(RSA_KEY, key_ops=["verify"])),
        ("key_ops sign", public(RSA_KEY, key_ops=["sign"])),
        ("key_ops empty", public(RSA_KEY, key_ops=[])),
        ("key_ops a string verify", public(RSA_KEY, key_ops="verify")),
        ("key_ops a string sign", public(RSA_KEY, key_ops="sign")),
        ("key_ops a string and use", public(RSA_KEY, key_ops="verify", use="sig")),
        ("key_ops encrypt with use sig", public(RSA_KEY, key_ops=["encrypt"], use="sig")),
        ("key_ops verify with use sig", public(RSA_KEY, key_ops=["verify"], use="sig")),
        ("key_ops unknown", public(RSA_KEY, key_ops=["verify", "bogus"])),
        ("key_ops null", public(RSA_KEY, key_ops=[None])),
        ("x5u not a url", public(RSA_KEY, x5u="ftp://a")),
        ("x5c with a number", public(RSA_KEY, x5c=["MIIB", 1])),
        ("x5t a number", public(RSA_KEY, x5t=1)),
        ("an unregistered member", public(RSA_KEY, extra={"any": "thing"})),
        ("rsa private, complete", {**rsa_private, "kid": "k"}),
        ("rsa private, d only", {k: v for k, v in rsa_private.items() if k not in ("p", "q", "dp", "dq", "qi")}),
        ("rsa private, some primes", {k: v for k, v in rsa_private.items() if k not in ("dp", "dq")}),
        ("rsa private, d of another key", {**rsa_private, "d": OTHER_RSA.as_dict(private=True)["d"]}),
        ("rsa d only, of another key", {**public(RSA_KEY), "d": OTHER_RSA.as_dict(private=True)["d"]}),
        ("rsa primes without d", {k: v for k, v in rsa_private.items() if k != "d"}),
        ("rsa private, oth", {**rsa_private, "oth": []}),
        ("rsa d not a string", {**public(RSA_KEY), "d": 5}),
        ("ec private", EC_256.as_dict(private=True)),
        ("ec d of another key", {**public(EC_256), "d": OTHER_EC_256.as_dict(private=True)["d"]}),
        ("ec d empty", {**public(EC_256), "d": ""}),
    ]


ODD = _odd_documents()


@pytest.mark.parametrize("document", [d for _, d in ODD], ids=[name for name, _ in ODD])
def test_odd_jwks_are_imported_or_refused_as_joserfc_does(document: dict[str, Any]) -> None:
    imported_alike(document)


def test_the_odd_jwks_include_some_each_side_accepts_and_refuses() -> None:
    outcomes = {name: imported_alike(document) for name, document in ODD}
    assert outcomes["rsa private, complete"] and outcomes["ec private"] and outcomes["x with a leading zero byte"]
    assert not outcomes["n padded"] and not outcomes["rsa private, d of another key"] and not outcomes["crv P-192"]


def _mutated(draw: Any, key: jwk.Key) -> dict[str, Any]:
    document = key.as_dict(private=draw(st.booleans()))
    names = sorted({*document, *JWK_PARAMETER_REGISTRY, *type(key).value_registry})
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        current = document.get(name)
        longer = current + "A" if isinstance(current, str) else "A"  # a number one letter longer
        value = draw(st.sampled_from([*VALUES, "drop", longer]))
        if value == "drop":
            document.pop(name, None)
        else:
            document[name] = value
    return document


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_mutated_jwk_is_imported_or_refused_as_joserfc_does(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from([RSA_KEY, EC_256, EC_384]))
    imported_alike(_mutated(data.draw, key))


# --- KeySet.load ----------------------------------------------------------------------------------


def test_a_jwk_joserfc_could_not_import_is_skipped_and_the_others_still_load(caplog: pytest.LogCaptureFixture) -> None:
    """A crv joserfc did not know raised KeyError out of its import, which failed the whole refresh;
    now that key alone is skipped, named in the warning, with what to fix and no number."""
    good = public(RSA_KEY, kid="good")
    odd = public(EC_256, kid="odd", crv="P-192")
    with caplog.at_level(logging.WARNING, "sidekey.tokens"):
        v = validator_of(good, odd)
    assert set(v.keys.keys) == {"good"}
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "odd" in warning and "crv" in warning
    assert odd["x"] not in warning and odd["y"] not in warning


def test_a_jwks_publishing_private_members_loads_as_before_and_says_to_rotate(caplog: pytest.LogCaptureFixture) -> None:
    private = {**EC_256.as_dict(private=True), "kid": "leaked"}
    with caplog.at_level(logging.WARNING, "sidekey.tokens"):
        v = validator_of(private)
    assert set(v.keys.keys) == {"leaked"}
    assert isinstance(same(signed({"alg": "ES256", "kid": "leaked"}, claims(), EC_256, "ES256"), v), tokens.Identity)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "leaked" in warning and "rotate" in warning and "(d)" in warning
    assert private["d"] not in warning


def test_the_generation_moves_only_when_a_jwk_changes() -> None:
    v = validator_of(public(RSA_KEY, kid="a"))
    keys, generation = v.keys, v.keys.generation
    assert not keys.load({"keys": [dict(reversed(list(public(RSA_KEY, kid="a").items())))]})  # members reordered
    assert keys.generation == generation
    assert keys.load({"keys": [public(RSA_KEY, kid="a", x5t="thumb")]})  # any member, as a JWK document
    assert keys.generation == generation + 1


# --- tokens of every algorithm and of odd keys ------------------------------------------------------


def _token(key: jwk.Key, alg: str, kid: str, **header: Any) -> str:
    return signed({"alg": alg, "kid": kid, **header}, claims(), key, alg)


@pytest.mark.parametrize(
    ("key", "alg", "members", "expected"),
    [
        (EC_384, "ES384", {"alg": "ES384"}, "accepted"),
        (EC_384, "ES384", {}, "accepted"),
        (EC_384, "ES512", {}, "malformed"),  # the curve is not the algorithm's
        (EC_521, "ES512", {"alg": "ES512"}, "accepted"),
        (EC_521, "ES512", {}, "accepted"),
        (EC_521, "ES256", {}, "malformed"),
        (EC_256, "ES256", {"key_ops": ["sign"]}, "malformed"),  # key_ops refuse verify
        (EC_256, "ES256", {"key_ops": "verify"}, "accepted"),  # a string, searched as joserfc searches it
        (RSA_KEY, "PS256", {}, "accepted"),
        (RSA_KEY, "PS384", {}, "accepted"),
        (RSA_KEY, "PS512", {"alg": "PS512"}, "accepted"),
        (RSA_KEY, "PS384", {"alg": "PS512"}, "bad_algorithm"),
        (RSA_KEY, "RS384", {}, "accepted"),
        (RSA_KEY, "RS512", {"key_ops": ["verify"], "use": "sig"}, "accepted"),
        (RSA_KEY, "RS256", {"key_ops": "sign"}, "malformed"),
        (RSA_KEY, "RS256", {"alg": ""}, "accepted"),
        (RSA_1024, "RS256", {}, "accepted"),
    ],
)
def test_tokens_of_each_algorithm_and_odd_key_are_decided_as_before(
    key: jwk.Key, alg: str, members: dict[str, Any], expected: str
) -> None:
    v = validator_of(public(key, kid="k", **members))
    got = same(_token(key, alg, "k"), v)
    assert ("accepted" if isinstance(got, tokens.Identity) else got) == expected


@pytest.mark.parametrize(("published", "signer", "alg"), [(RSA_KEY, EC_256, "ES256"), (EC_256, RSA_KEY, "RS256"),
                                                         (EC_256, RSA_KEY, "PS256"), (RSA_KEY, EC_521, "ES512")])
def test_a_token_whose_kid_names_a_key_of_another_type_is_refused_as_before(
    published: jwk.Key, signer: jwk.Key, alg: str
) -> None:
    assert same(_token(signer, alg, "k"), validator_of(public(published, kid="k"))) == "bad_algorithm"


def test_a_key_with_private_members_verifies_as_before() -> None:
    v = validator_of({**RSA_KEY.as_dict(private=True), "kid": "k"}, {**EC_521.as_dict(private=True), "kid": "e"})
    assert isinstance(same(_token(RSA_KEY, "PS256", "k"), v), tokens.Identity)
    assert isinstance(same(_token(EC_521, "ES512", "e"), v), tokens.Identity)
    assert same(_token(OTHER_RSA, "RS256", "k"), v) == "bad_signature"


def test_a_pss_signature_with_another_salt_length_is_refused_as_before() -> None:
    """joserfc verifies PSS with a salt of the digest's length only; a maximal salt does not verify."""
    head = b64(json.dumps({"alg": "PS256", "kid": "k"}).encode())
    body = b64(json.dumps(claims()).encode())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    signature = RSA_KEY.private_key.sign(f"{head}.{body}".encode(), pss, hashes.SHA256())  # type: ignore[union-attr]
    v = validator_of(public(RSA_KEY, kid="k"))
    assert same(f"{head}.{body}.{b64(signature)}", v) == "bad_signature"
    assert isinstance(same(_token(RSA_KEY, "PS256", "k"), v), tokens.Identity)


def _with_signature(token: str, raw: bytes) -> str:
    head, body, _ = token.split(".")
    return f"{head}.{body}.{b64(raw)}"


@pytest.mark.parametrize(("key", "alg", "size"), [(EC_256, "ES256", 32), (EC_384, "ES384", 48), (EC_521, "ES512", 66)])
def test_ec_signatures_of_the_wrong_size_or_encoding_are_refused_as_before(key: jwk.Key, alg: str, size: int) -> None:
    v = validator_of(public(key, kid="k"), public(key, kid="no-verify", key_ops=["sign"]))
    token = _token(key, alg, "k")
    raw = base64.urlsafe_b64decode(token.split(".")[2] + "==")
    assert len(raw) == 2 * size and isinstance(same(token, v), tokens.Identity)
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    variants = [raw[:-1], raw + b"\0", b"\0" + raw, raw[1:size] + raw[size:], raw[: 2 * size - 2],
                b"\0" * (2 * size), utils.encode_dss_signature(r, s), raw[size:] + raw[:size]]
    for variant in variants:
        assert same(_with_signature(token, variant), v) == "bad_signature", len(variant)
    # a key whose key_ops refuse verify: a wrong-size signature is still a bad signature, the right size malformed
    for variant, expected in [(raw[:-1], "bad_signature"), (raw, "malformed")]:
        assert same(_with_signature(_token(key, alg, "no-verify"), variant), v) == expected


def test_an_ec_signature_with_r_or_s_out_of_range_is_refused_as_before() -> None:
    v = validator_of(public(EC_256, kid="k"))
    token = _token(EC_256, "ES256", "k")
    order = ec.SECP256R1().group_order
    for r, s in [(0, 1), (1, 0), (order, 1), (2**256 - 1, 2**256 - 1)]:
        assert same(_with_signature(token, r.to_bytes(32, "big") + s.to_bytes(32, "big")), v) == "bad_signature"


# --- joserfc's size limits, at and just over -----------------------------------------------------------


def _header_of_length(length: int) -> dict[str, Any]:
    for n in range(length):
        header = {"alg": "RS256", "kid": "k", "typ": "J" * n}
        if len(b64(json.dumps(header).encode())) == length:
            return header
    raise AssertionError(length)


@pytest.mark.parametrize(("length", "expected"), [(511, "accepted"), (512, "accepted"), (514, "malformed"),
                                                  (515, "malformed")])
def test_a_header_at_and_over_joserfcs_limit_is_decided_as_before(length: int, expected: str) -> None:
    v = validator_of(public(RSA_KEY, kid="k"))
    token = signed(_header_of_length(length), claims(), RSA_KEY)
    assert len(token.split(".")[0]) == length
    got = same(token, v)
    assert ("accepted" if isinstance(got, tokens.Identity) else got) == expected


@pytest.mark.parametrize(("length", "expected"), [(1023, "bad_signature"), (1024, "bad_signature"),
                                                  (1025, "malformed"), (1028, "malformed")])
def test_a_signature_at_and_over_joserfcs_limit_is_decided_as_before(length: int, expected: str) -> None:
    """1024 letters decode (to a signature of the wrong length), 1028 would too: only the limit refuses them."""
    v = validator_of(public(RSA_KEY, kid="k"))
    head, body, _ = _token(RSA_KEY, "RS256", "k").split(".")
    assert same(f"{head}.{body}.{'A' * length}", v) == expected


@pytest.mark.parametrize(("length", "expected"), [(128_000, "accepted"), (128_004, "malformed")])
def test_a_payload_at_and_over_joserfcs_limit_is_decided_as_before(
    length: int, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token cap (16 KiB) refuses such payloads first; raised here, joserfc's limit decides."""
    monkeypatch.setattr(tokens, "MAX_TOKEN_BYTES", 200_000)
    payload = json.dumps(claims(jti="j" * (length * 3 // 4 - len(json.dumps(claims(jti="")))))).encode()
    assert len(b64(payload)) == length
    v = validator_of(public(RSA_KEY, kid="k"))
    got = same(signed({"alg": "RS256", "kid": "k"}, payload, RSA_KEY), v)
    assert ("accepted" if isinstance(got, tokens.Identity) else got) == expected


def test_a_payload_over_the_token_cap_is_refused_as_before() -> None:
    v = validator_of(public(RSA_KEY, kid="k"))
    token = signed({"alg": "RS256", "kid": "k"}, claims(jti="j" * tokens.MAX_TOKEN_BYTES), RSA_KEY)
    assert same(token, v) == "malformed"
