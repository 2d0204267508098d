"""The token catalogue (RFC 8725): forged and misused tokens against a running sidecar.

Every case is sent to the real ``sidekey proxy`` of the attacker's world on an
allowed route (``GET /openai/models``). Each must be refused with 401 and a
JSON error, the upstream must record nothing, and the trap (the attacker's
host, named by ``jku``/``x5u`` headers) must see no connection.

Tokens whose only defect is a claim are signed with the cluster's *real*
signing key, and a control case shows such a token with correct claims is
accepted, so a refusal can only come from the defect under test. Tokens that
need the cluster's cooperation (another pod, namespace or account, a legacy
Secret token, the apiserver's own audience) are minted by the real apiserver.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from joserfc import jwe, jwk

from tests.attacks import forging, world
from tests.attacks.forging import DROP, b64, compact
from tests.attacks.world import World
from tests.support.namespaces import make_namespace

pytestmark = pytest.mark.e2e

ALLOWED = "/openai/models"


@dataclass
class Minted:
    """Real tokens the apiserver issues, each wrong for this sidecar in one way."""

    other_pod: str
    other_namespace: str
    other_account: str
    unbound: str
    api_audience: str
    legacy: str
    one_year: str  # this pod, this account, the sidekey audience: only its lifetime is wrong


@dataclass
class Ctx:
    w: World
    f: forging.Forger
    m: Minted


@pytest.fixture(scope="module")
def ctx(attack_world: World) -> Iterator[Ctx]:
    w = attack_world
    cluster, ns = w.cluster, w.namespace
    forger = forging.Forger.for_cluster(cluster, ns, world.POD, w.pod_uid, world.SA, w.token)
    # another pod of the same account and namespace
    other = world.apply(cluster, world.injected_pod(ns, "other-pod"))
    # another service account, with its own pod
    world.apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                          "metadata": {"name": "intruder", "namespace": ns}})
    intruder = world.apply(cluster, world.injected_pod(ns, "intruder-pod", sa="intruder"))
    # the same account and pod name in another namespace
    elsewhere = make_namespace(cluster, "skattack-other")
    world.apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount",
                          "metadata": {"name": world.SA, "namespace": elsewhere}})
    twin = world.apply(cluster, world.injected_pod(elsewhere))
    # a legacy, Secret-based token: the token controller fills it in
    world.apply(cluster, {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                          "metadata": {"name": "legacy-token", "namespace": ns,
                                       "annotations": {"kubernetes.io/service-account.name": world.SA}}})
    legacy: list[str] = []

    def filled() -> bool:
        out = json.loads(cluster.kubectl("get", "secret", "legacy-token", "-n", ns, "-o", "json"))
        token = (out.get("data") or {}).get("token")
        if token:
            legacy.append(base64.b64decode(token).decode())
        return bool(token)

    world.wait_until(filled, 30, "the token controller to fill the legacy token")
    minted = Minted(
        other_pod=cluster.token(ns, world.SA, audience="sidekey", pod_name="other-pod",
                                pod_uid=other["metadata"]["uid"]),
        other_namespace=cluster.token(elsewhere, world.SA, audience="sidekey", pod_name=world.POD,
                                      pod_uid=twin["metadata"]["uid"]),
        other_account=cluster.token(ns, "intruder", audience="sidekey", pod_name="intruder-pod",
                                    pod_uid=intruder["metadata"]["uid"]),
        unbound=cluster.token(ns, world.SA, audience="sidekey"),
        api_audience=cluster.token(ns, world.SA, audience=cluster.issuer, pod_name=world.POD,
                                   pod_uid=w.pod_uid),
        legacy=legacy[0],
        # what `kubectl create token agent --audience sidekey --bound-object-kind Pod ... --duration 8760h` gives
        one_year=cluster.token(ns, world.SA, audience="sidekey", pod_name=world.POD, pod_uid=w.pod_uid,
                               seconds=365 * 86400),
    )
    try:
        yield Ctx(w, forger, minted)
    finally:
        cluster.kubectl("delete", "namespace", elsewhere, "--wait=false", check=False)


def _raw_time_claim(c: Ctx, claim: str, literal: str) -> str:
    """The real key signs claims whose ``claim`` is ``literal`` as written (NaN, Infinity, 1e400)."""
    text = json.dumps(c.f.claims(**{claim: 1234567890}))
    return c.f.real(text.replace(f'"{claim}": 1234567890', f'"{claim}": {literal}').encode())


def _swap_alg(token: str, alg: str) -> str:
    head, payload, sig = token.split(".")
    header = json.loads(forging.unb64(head))
    header["alg"] = alg
    return f"{b64(json.dumps(header).encode())}.{payload}.{sig}"


def _tamper(token: str, **changes: Any) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(forging.unb64(payload))
    claims.update(changes)
    return f"{head}.{b64(json.dumps(claims).encode())}.{sig}"


def _json_serialization(token: str, flattened: bool) -> str:
    head, payload, sig = token.split(".")
    member = {"protected": head, "signature": sig}
    doc = {"payload": payload, **member} if flattened else {"payload": payload, "signatures": [member]}
    return json.dumps(doc, separators=(",", ":"))


def _jwe(c: Ctx) -> str:
    public = jwk.RSAKey.import_key(c.f.real_public_pem)
    return jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": c.f.real_kid},
                               json.dumps(c.f.claims()).encode(), public,
                               algorithms=["RSA-OAEP-256", "A256GCM"])


def _duplicate(c: Ctx, first_good: bool) -> str:
    """Two ``kubernetes.io`` members: one binds this pod, the other another pod."""
    claims = c.f.claims()
    good = json.dumps(claims["kubernetes.io"])
    bad_claim = dict(claims["kubernetes.io"], pod={"name": "other-pod", "uid": "another-uid"})
    bad = json.dumps(bad_claim)
    rest = json.dumps({k: v for k, v in claims.items() if k != "kubernetes.io"})[1:-1]
    a, b = (good, bad) if first_good else (bad, good)
    payload = f'{{{rest},"kubernetes.io":{a},"kubernetes.io":{b}}}'.encode()
    return c.f.real(payload)


def _nested_alg_none(c: Ctx) -> str:
    return compact({"alg": "none", "kid": c.f.real_kid}, c.f.claims(), None, None)


def _hs256_public_pem(c: Ctx) -> str:
    return compact({"alg": "HS256", "kid": c.f.real_kid}, c.f.claims(), "HS256", c.f.real_public_pem)


def _hs256_public_jwk(c: Ctx) -> str:
    doc = json.dumps(forging.jwk_of(c.f.real_key.public_key(), c.f.real_kid), separators=(",", ":"))
    return compact({"alg": "HS256", "kid": c.f.real_kid}, c.f.claims(), "HS256", doc.encode())


def _es256_real_kid(c: Ctx) -> str:
    return compact({"alg": "ES256", "kid": c.f.real_kid}, c.f.claims(), "ES256", c.f.attacker_ec)


def _ps256_attacker_real_kid(c: Ctx) -> str:
    return compact({"alg": "PS256", "kid": c.f.real_kid}, c.f.claims(), "PS256", c.f.attacker)


def _x5c(c: Ctx) -> str:
    cert = base64.b64encode(forging.self_signed(c.f.attacker)).decode()
    return c.f.by_attacker(x5c=[cert], kid=c.f.real_kid)


#: id -> how to build the credential (the Authorization value after "Bearer ", or raw bytes).
CATALOGUE: dict[str, Callable[[Ctx], str | bytes]] = {
    # --- algorithm attacks
    "alg-none": _nested_alg_none,
    "alg-none-mixed-case": lambda c: compact({"alg": "nOnE", "kid": c.f.real_kid}, c.f.claims(), None, None),
    "alg-none-real-signature-kept": lambda c: _swap_alg(c.f.real(), "none"),
    "hs256-keyed-with-the-public-pem": _hs256_public_pem,
    "hs256-keyed-with-the-public-jwk": _hs256_public_jwk,
    "hs512-keyed-with-the-public-pem": lambda c: compact(
        {"alg": "HS512", "kid": c.f.real_kid}, c.f.claims(), "HS512", c.f.real_public_pem),
    "rs256-relabelled-ps256": lambda c: _swap_alg(c.f.real(), "PS256"),
    "rs256-relabelled-es256": lambda c: _swap_alg(c.f.real(), "ES256"),
    "rs256-relabelled-rs512": lambda c: _swap_alg(c.f.real(), "RS512"),
    "es256-by-attacker-with-the-real-kid": _es256_real_kid,
    "ps256-by-attacker-with-the-real-kid": _ps256_attacker_real_kid,
    # --- signature and serialisation
    "tampered-payload-pod-uid": lambda c: _tamper(c.m.other_pod, **{
        "kubernetes.io": {"namespace": c.w.namespace, "pod": {"name": world.POD, "uid": c.w.pod_uid},
                          "serviceaccount": {"name": world.SA, "uid": "x"}}}),
    "tampered-payload-exp-extended": lambda c: _tamper(c.w.token, exp=int(time.time()) + 10**8),
    "stripped-signature": lambda c: c.w.token.rsplit(".", 1)[0] + ".",
    "stripped-signature-two-parts": lambda c: c.w.token.rsplit(".", 1)[0],
    "signature-of-another-token": lambda c: c.w.token.rsplit(".", 1)[0] + "." + c.m.other_pod.rsplit(".", 1)[1],
    "jwe-compact": _jwe,
    "jws-json-general": lambda c: _json_serialization(c.w.token, flattened=False),
    "jws-json-flattened": lambda c: _json_serialization(c.w.token, flattened=True),
    # --- key-location headers: ignored, never fetched (the trap must see nothing)
    "jku-to-attacker": lambda c: c.f.by_attacker(jku=f"{c.w.trap.url}/jwks.json"),
    "jku-with-the-real-kid": lambda c: c.f.by_attacker(jku=f"{c.w.trap.url}/jwks.json", kid=c.f.real_kid),
    "x5u-to-attacker": lambda c: c.f.by_attacker(x5u=f"{c.w.trap.url}/cert.pem", kid=c.f.real_kid),
    "jwk-embedded-attacker-key": lambda c: c.f.by_attacker(
        jwk=forging.jwk_of(c.f.attacker.public_key(), c.f.real_kid), kid=c.f.real_kid),
    "x5c-embedded-attacker-cert": _x5c,
    "unknown-kid": lambda c: c.f.by_attacker(kid="no-such-kid"),
    "kid-path-traversal": lambda c: c.f.by_attacker(kid="../../../../dev/null"),
    "kid-missing": lambda c: compact({"alg": "RS256"}, c.f.claims(), "RS256", c.f.attacker),
    "another-clusters-key-same-kid": lambda c: c.f.by_attacker(kid=c.f.real_kid),
    # --- time claims (real signature)
    "expired": lambda c: c.f.real(c.f.claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 4200,
                                             nbf=int(time.time()) - 4200)),
    "expired-beyond-leeway": lambda c: c.f.real(c.f.claims(exp=int(time.time()) - 120)),
    "nbf-in-the-future": lambda c: c.f.real(c.f.claims(nbf=int(time.time()) + 3600)),
    "iat-in-the-future": lambda c: c.f.real(c.f.claims(iat=int(time.time()) + 3600)),
    "exp-missing": lambda c: c.f.real(c.f.claims(exp=DROP)),
    "exp-as-a-string": lambda c: c.f.real(c.f.claims(exp=str(int(time.time()) + 600))),
    "exp-as-a-boolean": lambda c: c.f.real(c.f.claims(exp=True)),
    "nbf-as-a-string": lambda c: c.f.real(c.f.claims(nbf="0")),
    # --- lifetime (exp - iat) and numbers that are no timestamps
    "minted-by-the-apiserver-for-one-year": lambda c: c.m.one_year,
    "lifetime-two-days": lambda c: c.f.real(c.f.claims(exp=int(time.time()) + 2 * 86400)),
    "lifetime-one-day-and-two-minutes": lambda c: c.f.real(c.f.claims(exp=int(time.time()) + 86400 + 120)),
    "iat-missing": lambda c: c.f.real(c.f.claims(iat=DROP)),
    "exp-before-iat": lambda c: c.f.real(c.f.claims(iat=int(time.time()) + 20, exp=int(time.time()) + 10)),
    "exp-nan": lambda c: _raw_time_claim(c, "exp", "NaN"),
    "exp-infinity": lambda c: _raw_time_claim(c, "exp", "Infinity"),
    "exp-1e400-overflows-to-infinity": lambda c: _raw_time_claim(c, "exp", "1e400"),
    "exp-beyond-year-9999": lambda c: _raw_time_claim(c, "exp", str(10**12)),
    "iat-nan": lambda c: _raw_time_claim(c, "iat", "NaN"),
    "iat-minus-infinity": lambda c: _raw_time_claim(c, "iat", "-Infinity"),
    "nbf-nan": lambda c: _raw_time_claim(c, "nbf", "NaN"),
    # --- issuer and audience (real signature)
    "wrong-issuer": lambda c: c.f.real(c.f.claims(iss="https://evil.example")),
    "issuer-with-trailing-slash": lambda c: c.f.real(c.f.claims(iss=c.f.issuer + "/")),
    "issuer-missing": lambda c: c.f.real(c.f.claims(iss=DROP)),
    "audience-as-superstring": lambda c: c.f.real(c.f.claims(aud="sidekey-evil")),
    "audience-as-substring": lambda c: c.f.real(c.f.claims(aud=["sidek"])),
    "audience-in-a-string-list": lambda c: c.f.real(c.f.claims(aud="sidekey,other")),
    "audience-of-the-apiserver": lambda c: c.m.api_audience,
    "audience-missing": lambda c: c.f.real(c.f.claims(aud=DROP)),
    # --- the binding to this pod
    "another-pod": lambda c: c.m.other_pod,
    "another-namespace": lambda c: c.m.other_namespace,
    "another-service-account": lambda c: c.m.other_account,
    "another-service-account-forged-on-this-pod": lambda c: c.f.real(c.f.claims(
        sub=f"system:serviceaccount:{c.w.namespace}:intruder",
        **{"kubernetes.io": {"namespace": c.w.namespace, "pod": {"name": world.POD, "uid": c.w.pod_uid},
                             "serviceaccount": {"name": "intruder", "uid": "x"}}})),
    "subject-disagrees-with-claims": lambda c: c.f.real(c.f.claims(sub="system:serviceaccount:kube-system:admin")),
    "not-bound-to-a-pod": lambda c: c.m.unbound,
    "pod-claim-of-the-wrong-type": lambda c: c.f.real(c.f.claims(**{"kubernetes.io": "pod"})),
    "legacy-secret-based-token": lambda c: c.m.legacy,
    # --- parser attacks
    "oversized-token": lambda c: c.w.token + "A" * 20_000,
    "oversized-header-segment": lambda c: b64(b'{"alg":"RS256","kid":"' + b"k" * 30_000 + b'"}') + ".e30.AA",
    "deeply-nested-json-header": lambda c: b64(b"[" * 2500 + b"]" * 2500) + ".e30.AA",
    "deeply-nested-json-payload": lambda c: c.f.real(b"[" * 2500 + b"]" * 2500),
    "non-utf8-token-bytes": lambda c: c.w.token.encode()[:40] + b"\xff\xfe\x80" + c.w.token.encode()[40:],
    "non-utf8-payload": lambda c: c.f.real(b'{"iss":"\xff\xfe"}'),
    "payload-not-an-object": lambda c: c.f.real(b'["sidekey"]'),
    "duplicate-claims-last-wrong": lambda c: _duplicate(c, first_good=True),
    "duplicate-claims-first-wrong": lambda c: _duplicate(c, first_good=False),
    "crit-header-unknown-extension": lambda c: c.f.real(None, crit=["x-unknown"], **{"x-unknown": 1}),
    "b64-false-unencoded-payload": lambda c: c.f.real(None, b64=False, crit=["b64"]),
    "empty-bearer": lambda c: "",
    "token-with-whitespace-inside": lambda c: c.w.token[:20] + " " + c.w.token[20:],
}


def _send(c: Ctx, credential: str | bytes, header: str = "Authorization") -> world.Response:
    value = credential if isinstance(credential, bytes) else credential.encode()
    prefix = b"Bearer " if header == "Authorization" else b""
    data = (f"GET {ALLOWED} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
            + header.encode() + b": " + prefix + value + b"\r\n\r\n")
    return world.raw_request(c.w.sidecar.port, data)


def test_the_catalogue_has_at_least_25_cases() -> None:
    assert len(CATALOGUE) >= 25


def test_control_a_token_signed_with_the_real_key_and_right_claims_is_accepted(ctx: Ctx) -> None:
    """Without this, the catalogue could pass because forging itself was broken."""
    before = len(ctx.w.upstream.seen)
    answer = _send(ctx, ctx.f.real())
    assert answer.status == 200, answer.raw[:500]
    assert len(ctx.w.upstream.seen) == before + 1
    assert _send(ctx, ctx.w.token).status == 200


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_a_forged_or_misused_token_is_refused_and_reaches_nothing(ctx: Ctx, fresh: World, case: str) -> None:
    credential = CATALOGUE[case](ctx)
    before = len(ctx.w.upstream.seen)
    answer = _send(ctx, credential)
    assert answer.status in (400, 401), (case, answer.raw[:600])
    if answer.status == 401:
        error = answer.json()["error"]
        assert error["type"] == "authentication_error" and error["message"]
    else:  # only the HTTP parser itself may refuse earlier (a header it cannot read)
        assert case.startswith(("non-utf8", "oversized")), answer.raw[:300]
    assert ctx.w.upstream.seen[before:] == [], f"{case} reached the upstream"
    assert ctx.w.sidecar.process.poll() is None


@pytest.mark.parametrize("header", ["x-api-key", "api-key"])
@pytest.mark.parametrize("case", ["alg-none", "another-pod", "hs256-keyed-with-the-public-pem", "expired"])
def test_the_sdk_key_headers_refuse_the_same_tokens(ctx: Ctx, fresh: World, case: str, header: str) -> None:
    before = len(ctx.w.upstream.seen)
    answer = _send(ctx, CATALOGUE[case](ctx), header=header)
    assert answer.status == 401, answer.raw[:400]
    assert ctx.w.upstream.seen[before:] == []
