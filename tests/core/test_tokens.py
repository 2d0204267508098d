"""The token matrix: every way a token can be wrong, with locally generated RSA and EC keys."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from joserfc import jwk, jws, jwt

from sidekey.core import tokens

ISSUER = "https://127.0.0.1:6443"
NOW = 1_800_000_000.0

RSA = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS256", "use": "sig"})
RSA_2 = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-2", "alg": "RS256", "use": "sig"})
EC = jwk.ECKey.generate_key("P-256", parameters={"kid": "ec-1", "alg": "ES256", "use": "sig"})
STRANGER = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS256"})

BINDING = tokens.Binding(
    issuer=ISSUER,
    audience="sidekey",
    namespace="team",
    pod_name="agent-0",
    pod_uid="uid-0",
    service_account="agent",
)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": ["sidekey"],
        "sub": "system:serviceaccount:team:agent",
        "exp": int(NOW) + 600,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "kubernetes.io": {
            "namespace": "team",
            "pod": {"name": "agent-0", "uid": "uid-0"},
            "serviceaccount": {"name": "agent", "uid": "sa-uid"},
        },
    }
    for k, v in overrides.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def sign(payload: Mapping[str, Any], key: jwk.Key = RSA, alg: str = "RS256", kid: str | None = None) -> str:
    header = {"alg": alg, "kid": kid if kid is not None else key.kid}
    return jwt.encode(header, dict(payload), key, algorithms=[alg])


def sign_raw(payload: bytes, key: jwk.Key = RSA, alg: str = "RS256") -> str:
    """Sign payload bytes as written (JSON a well-behaved encoder would never produce)."""
    return jws.serialize_compact({"alg": alg, "kid": key.kid}, payload, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwks(*keys: jwk.Key) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """A JWKS endpoint whose content the test changes."""

    def __init__(self, *keys: jwk.Key) -> None:
        self.document = public_jwks(*keys)
        self.calls = 0
        self.fail = False

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.fail:
            raise OSError("apiserver unreachable")
        return self.document


async def make(
    *keys: jwk.Key, binding: tokens.Binding = BINDING, min_refetch: float = 5.0, mono: Clock | None = None
) -> tuple[tokens.Validator, Fetcher, Clock]:
    fetcher = Fetcher(*keys)
    clock = Clock()
    ks = tokens.KeySet(fetcher, min_refetch_seconds=min_refetch, clock=mono or Clock())
    await ks.refresh()
    return tokens.Validator(ks, binding, clock=clock), fetcher, clock


async def refused(token: str, reason: str, **kw: Any) -> str:
    v, _, _ = await make(RSA, EC, **kw)
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(token)
    assert info.value.reason == reason, info.value.message
    assert token not in info.value.message
    return info.value.message


# --- accepted ----------------------------------------------------------------------


async def test_a_pod_bound_rsa_token_is_accepted() -> None:
    v, _, _ = await make(RSA, EC)
    identity = await v.validate(sign(claims()))
    assert identity.service_account == "agent"
    assert identity.pod_uid == "uid-0"
    assert identity.expires_at == NOW + 600


async def test_an_ec_token_is_accepted() -> None:
    v, _, _ = await make(RSA, EC)
    assert (await v.validate(sign(claims(), EC, "ES256"))).namespace == "team"


async def test_a_string_audience_is_accepted() -> None:
    v, _, _ = await make(RSA)
    assert await v.validate(sign(claims(aud="sidekey")))


async def test_one_of_several_audiences_is_enough() -> None:
    v, _, _ = await make(RSA)
    assert await v.validate(sign(claims(aud=["other", "sidekey"])))


async def test_expiry_within_the_leeway_is_accepted() -> None:
    v, _, clock = await make(RSA)
    token = sign(claims())
    clock.now = NOW + 600 + BINDING.leeway - 1
    assert await v.validate(token)


async def test_a_binding_without_a_service_account_accepts_any_account() -> None:
    b = tokens.Binding(
        issuer=ISSUER, audience="sidekey", namespace="team", pod_name="agent-0", pod_uid="uid-0"
    )
    v, _, _ = await make(RSA, binding=b)
    assert (await v.validate(sign(claims()))).service_account == "agent"


# --- refused -------------------------------------------------------------------------


async def test_alg_none_is_refused() -> None:
    token = (
        f"{b64(json.dumps({'alg': 'none', 'kid': 'rsa-1'}).encode())}.{b64(json.dumps(claims()).encode())}."
    )
    await refused(token, "bad_algorithm")


async def test_hs256_signed_with_the_public_key_is_refused() -> None:
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    secret = json.dumps(RSA.as_dict(private=False)).encode()
    sig = b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    await refused(f"{header}.{payload}.{sig}", "bad_algorithm")


async def test_an_rs256_header_on_an_ec_key_is_refused() -> None:
    token = sign(claims(), RSA, "RS256", kid="ec-1")
    await refused(token, "bad_algorithm")


async def test_a_tampered_payload_is_refused() -> None:
    h, _, s = sign(claims()).split(".")
    evil = b64(json.dumps(claims(sub="system:serviceaccount:team:admin")).encode())
    await refused(f"{h}.{evil}.{s}", "bad_signature")


async def test_a_token_signed_by_another_key_with_a_known_kid_is_refused() -> None:
    await refused(sign(claims(), STRANGER), "bad_signature")


async def test_an_expired_token_is_refused_and_says_to_reread_the_file() -> None:
    message = await refused(sign(claims(exp=int(NOW) - 61, iat=int(NOW) - 661, nbf=None)), "expired")
    assert "every request" in message


async def test_nbf_in_the_future_is_refused() -> None:
    await refused(sign(claims(nbf=int(NOW) + 120)), "not_yet_valid")


async def test_iat_in_the_future_is_refused() -> None:
    await refused(sign(claims(iat=int(NOW) + 120)), "issued_in_future")


async def test_a_token_without_exp_is_refused() -> None:
    await refused(sign(claims(exp=None)), "malformed")


async def test_a_token_without_iat_is_refused() -> None:
    message = await refused(sign(claims(iat=None)), "malformed")
    assert "iat" in message


async def test_a_token_that_expires_before_it_was_issued_is_refused() -> None:
    message = await refused(sign(claims(iat=int(NOW) - 10, exp=int(NOW) - 11)), "malformed")
    assert "before it was issued" in message


async def test_a_lifetime_up_to_the_cap_plus_leeway_is_accepted() -> None:
    v, _, _ = await make(RSA)
    iat = int(NOW) - 10
    assert await v.validate(sign(claims(iat=iat, exp=iat + tokens.MAX_LIFETIME + BINDING.leeway)))


@pytest.mark.parametrize("lifetime", [tokens.MAX_LIFETIME + BINDING.leeway + 1, 365 * 86400])
async def test_a_lifetime_above_the_cap_is_refused(lifetime: int) -> None:
    iat = int(NOW) - 10
    message = await refused(sign(claims(iat=iat, exp=iat + lifetime)), "lifetime_too_long")
    assert f"{tokens.MAX_LIFETIME} s" in message and "minted by hand" in message


async def test_a_binding_can_cap_the_lifetime_lower() -> None:
    v, _, _ = await make(RSA, binding=dataclasses.replace(BINDING, max_lifetime=600))
    iat = int(NOW) - 10
    assert await v.validate(sign(claims(iat=iat, exp=iat + 600)))
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(sign(claims(iat=iat, exp=iat + 700)))
    assert info.value.reason == "lifetime_too_long"


def test_the_lifetime_cap_is_the_crds_maximum_token_expiration() -> None:
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "sidekey.io_agentpolicies.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["token"]["properties"]["expirationSeconds"]["maximum"] == tokens.MAX_LIFETIME


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_json_constants_in_a_time_claim_are_refused(claim: str, literal: str) -> None:
    body = json.dumps(claims()).replace(f'"{claim}": {claims()[claim]}', f'"{claim}": {literal}')
    assert literal in body
    message = await refused(sign_raw(body.encode()), "malformed")
    assert "NaN or Infinity" in message


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("raw", ["1e400", "-1", "253402300800", "1" + "0" * 300, "true", '"1800000600"'])
async def test_a_time_claim_that_is_no_timestamp_is_refused(claim: str, raw: str) -> None:
    body = json.dumps(claims()).replace(f'"{claim}": {claims()[claim]}', f'"{claim}": {raw}')
    assert raw in body
    message = await refused(sign_raw(body.encode()), "malformed")
    assert claim in message


async def test_a_wrong_issuer_is_refused() -> None:
    message = await refused(sign(claims(iss="https://evil.example")), "bad_issuer")
    assert ISSUER in message


async def test_an_issuer_prefix_is_not_enough() -> None:
    await refused(sign(claims(iss=ISSUER + "/x")), "bad_issuer")


async def test_the_apiserver_audience_is_refused_with_the_expected_one_named() -> None:
    message = await refused(sign(claims(aud=[ISSUER])), "bad_audience")
    assert "expected 'sidekey'" in message


async def test_another_pods_uid_is_refused() -> None:
    c = claims()
    c["kubernetes.io"]["pod"]["uid"] = "uid-other"
    await refused(sign(c), "wrong_pod")


async def test_another_pods_name_is_refused() -> None:
    c = claims()
    c["kubernetes.io"]["pod"]["name"] = "agent-1"
    await refused(sign(c), "wrong_pod")


async def test_another_namespace_is_refused() -> None:
    c = claims(sub="system:serviceaccount:other:agent")
    c["kubernetes.io"]["namespace"] = "other"
    await refused(sign(c), "wrong_namespace")


async def test_a_token_not_bound_to_a_pod_is_refused() -> None:
    c = claims()
    del c["kubernetes.io"]["pod"]
    await refused(sign(c), "not_pod_bound")


async def test_a_legacy_secret_based_token_is_refused() -> None:
    legacy = {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "team",
        "kubernetes.io/serviceaccount/secret.name": "agent-token-x",
        "kubernetes.io/serviceaccount/service-account.name": "agent",
        "sub": "system:serviceaccount:team:agent",
    }
    await refused(sign(legacy), "legacy_token")


async def test_a_subject_that_disagrees_with_the_claims_is_refused() -> None:
    await refused(sign(claims(sub="system:serviceaccount:team:admin")), "malformed")


async def test_another_service_account_is_refused() -> None:
    c = claims(sub="system:serviceaccount:team:other")
    c["kubernetes.io"]["serviceaccount"]["name"] = "other"
    await refused(sign(c), "wrong_service_account")


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c.d.e", "!!!.e30.x", "e30.e30.x"])
async def test_garbage_is_refused_without_a_crash(token: str) -> None:
    v, _, _ = await make(RSA)
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(token)
    assert info.value.reason in {"missing", "malformed", "bad_algorithm"}


async def test_an_oversized_token_is_refused_before_parsing() -> None:
    await refused("a" * (tokens.MAX_TOKEN_BYTES + 1), "malformed")


async def test_a_jwe_shaped_token_is_refused() -> None:
    await refused("e30." * 4 + "e30", "malformed")


def test_a_leeway_above_sixty_seconds_is_rejected() -> None:
    with pytest.raises(ValueError, match="60"):
        tokens.Binding(issuer=ISSUER, audience="a", namespace="n", pod_name="p", pod_uid="u", leeway=61)


# --- keys: unknown kid, rotation, retirement ---------------------------------------------


async def test_an_unknown_kid_refetches_the_jwks_and_then_validates() -> None:
    v, fetcher, _ = await make(RSA, min_refetch=0.0)
    fetcher.document = public_jwks(RSA, RSA_2)
    assert await v.validate(sign(claims(), RSA_2))
    assert fetcher.calls == 2


async def test_validate_now_checks_a_new_token_without_waiting_and_leaves_an_unknown_kid_to_validate() -> None:
    v, fetcher, _ = await make(RSA, min_refetch=0.0)
    new = sign(claims())
    assert v.cached(new) is None
    identity = v.validate_now(new)  # a first call, checked in full with no await
    assert identity is not None and identity.pod_name == "agent-0"
    assert v.cached(new) == identity  # and remembered
    with pytest.raises(tokens.TokenError) as info:
        v.validate_now(sign(claims(aud=["someone-else"])))
    assert info.value.reason == "bad_audience"
    fetcher.document = public_jwks(RSA, RSA_2)
    assert v.validate_now(sign(claims(), RSA_2)) is None  # an unknown kid: only validate refetches
    assert fetcher.calls == 1
    assert await v.validate(sign(claims(), RSA_2))
    assert fetcher.calls == 2


async def test_unknown_kid_refetches_are_rate_limited() -> None:
    mono = Clock()
    v, fetcher, _ = await make(RSA, mono=mono)
    for _ in range(5):
        with pytest.raises(tokens.TokenError) as info:
            await v.validate(sign(claims(), RSA_2))
        assert info.value.reason == "unknown_kid"
    assert fetcher.calls == 1  # the first fetch was within the interval
    mono.now += 6
    fetcher.document = public_jwks(RSA, RSA_2)
    assert await v.validate(sign(claims(), RSA_2))
    assert fetcher.calls == 2


async def test_a_rotated_key_is_picked_up_and_a_removed_key_stops_validating() -> None:
    v, fetcher, _ = await make(RSA)
    old = sign(claims())
    assert await v.validate(old)  # now cached
    fetcher.document = public_jwks(RSA_2)
    await v.keys.refresh()
    assert set(v.keys.keys) == {"rsa-2"}
    assert await v.validate(sign(claims(), RSA_2))
    with pytest.raises(tokens.TokenError) as info:
        await v.validate(old)
    assert info.value.reason == "unknown_kid"


async def test_a_failed_refresh_keeps_the_known_keys() -> None:
    results: list[str] = []
    fetcher = Fetcher(RSA)
    ks = tokens.KeySet(fetcher, on_refresh=results.append)
    assert await ks.refresh()
    fetcher.fail = True
    assert not await ks.refresh()
    assert set(ks.keys) == {"rsa-1"}
    assert results == ["changed", "error"]


async def test_jwks_entries_that_are_not_signing_keys_are_ignored() -> None:
    ks = tokens.KeySet(Fetcher())
    doc = public_jwks(RSA)
    doc["keys"] += [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        dict(RSA_2.as_dict(private=False), use="enc"),
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
    ]
    ks.load(doc)
    assert set(ks.keys) == {"rsa-1"}


# --- the cache ---------------------------------------------------------------------------


async def test_a_validated_token_is_served_from_the_cache_until_it_expires() -> None:
    v, _, clock = await make(RSA)
    token = sign(claims())
    first = await v.validate(token)
    assert v.cached(token) is first
    clock.now = NOW + 600 + BINDING.leeway + 1
    assert v.cached(token) is None
    with pytest.raises(tokens.TokenError):
        await v.validate(token)


async def test_the_cache_is_bounded() -> None:
    fetcher = Fetcher(RSA)
    ks = tokens.KeySet(fetcher)
    await ks.refresh()
    clock = Clock()
    v = tokens.Validator(ks, BINDING, cache_size=3, clock=clock)
    toks = [sign(claims(jti=str(i))) for i in range(5)]
    for t in toks:
        await v.validate(t)
    assert len(v._cache) == 3
    assert v.cached(toks[-1]) is not None
    assert v.cached(toks[0]) is None


def test_the_real_clock_is_the_default() -> None:
    ks = tokens.KeySet(Fetcher())
    v = tokens.Validator(ks, BINDING)
    assert abs(v._clock() - time.time()) < 5
