"""Offline validation of the agent's pod-bound service-account token.

The sidecar checks every caller without a round trip to the apiserver: the
signature against the apiserver's own JWKS, an algorithm allow-list (the
RS/PS/ES families; never ``none``, never HMAC, which would let the *public*
key sign), the issuer exactly, the audience, the time claims with a small
leeway, and the ``kubernetes.io`` claims that bind the token to one pod.

Peers have failed here by never refetching the key set on an unknown ``kid``
(agentgateway #2798, envoy #39643), so an unknown kid triggers a
rate-limited refetch, and a periodic refresh drops keys the apiserver no
longer publishes. Successful results are cached by a hash of the token until
the token expires, which keeps the hot path to one dict lookup.

A miss (the first call with each rotated token) pays one signature check by
joserfc's algorithm object and one strict read of the payload, little else:
the token is split once and each segment decoded once, with joserfc's own
strict base64url rules; the header, the same for every token a key signs, is
checked once (joserfc's header rules included) and remembered once a token
with it was accepted; unchanged JWKs keep their imported keys across
refreshes. The checks and their order are those of joserfc's
``deserialize_compact`` followed by the claims, which
tests/core/test_tokens_joserfc_parity.py holds it to.

The time claims bound the token's *lifetime*, not only its end: ``iat`` is
required and ``exp - iat`` may not exceed ``MAX_LIFETIME`` (the longest
``spec.token.expirationSeconds`` a policy may set) plus the leeway. The
kubelet's projected token never lives longer, so a longer one was minted by
hand (``kubectl create token --duration=8760h`` for the sidekey audience) and
would otherwise stay usable for as long as its minter chose. Every time claim
must be a finite number a timestamp can be: JSON's ``NaN`` and ``Infinity``
(which Python's parser accepts) and ``1e400`` would make ``exp`` never pass.

Errors carry a ``reason`` (a metric label) and a ``message`` for the agent's
developer; neither ever holds the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from joserfc import errors as jose_errors
from joserfc import jwk
from joserfc.jwa import JWSAlgModel
from joserfc.jws import JWSRegistry

from sidekey.core import errors

log = logging.getLogger("sidekey.tokens")

#: Asymmetric algorithms only: HS* would accept a token "signed" with the public key.
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
MAX_LEEWAY: Final = 60
DEFAULT_LEEWAY: Final = 30
#: An unknown kid refetches the JWKS at most this often.
DEFAULT_MIN_REFETCH_SECONDS: Final = 5.0
#: The periodic refresh, which also retires keys the apiserver dropped.
DEFAULT_REFRESH_SECONDS: Final = 60.0
#: Upper bound on cached validations; far above what one pod's agents use.
DEFAULT_CACHE_SIZE: Final = 1024
#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_BYTES: Final = 16 * 1024
#: The longest ``exp - iat`` accepted (plus the leeway): the CRD's maximum
#: ``spec.token.expirationSeconds``, so no projected token the webhook asks for is longer.
MAX_LIFETIME: Final = 86400
#: The latest time claim a token may carry (9999-12-31T23:59:59Z); time claims are
#: numbers of seconds in [0, MAX_TIMESTAMP], never NaN, infinite or beyond.
MAX_TIMESTAMP: Final = 253402300799

_KTY_FOR_ALG: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
#: joserfc's own algorithm objects, looked up once: ``verify(signing_input, signature, key)``
#: is the call its ``deserialize_compact`` ends in, without rebuilding a registry per token.
_JOSE_ALGORITHMS: Final[Mapping[str, JWSAlgModel]] = {
    name: JWSRegistry.algorithms[name] for name in ALLOWED_ALGORITHMS
}
#: joserfc's header rules (registered names only, each of its type): built once, not per token.
_JOSE_HEADERS: Final = JWSRegistry(algorithms=sorted(ALLOWED_ALGORITHMS))
#: How many distinct clean headers a validator remembers; an apiserver has one per signing key.
_HEADER_MEMO_SIZE: Final = 64


class TokenError(errors.Denied):
    """A refused token: ``reason`` for metrics, ``message`` for the developer."""

    type = "authentication_error"


@dataclass(frozen=True, slots=True)
class Binding:
    """What a token must say to be accepted by this sidecar."""

    issuer: str
    audience: str
    namespace: str
    pod_name: str
    pod_uid: str
    service_account: str | None = None  # None: any account (the policy decides)
    leeway: int = DEFAULT_LEEWAY
    #: The longest lifetime (``exp - iat``) accepted, before the leeway.
    max_lifetime: int = MAX_LIFETIME

    def __post_init__(self) -> None:
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY} seconds")
        if not 0 < self.max_lifetime <= MAX_LIFETIME:
            raise ValueError(f"max_lifetime must be between 1 and {MAX_LIFETIME} seconds")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who called: the claims that matter once a token passed."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    expires_at: float


class KeySet:
    """The apiserver's signing keys by kid, refreshed and retired.

    ``fetch`` returns the JWKS document (from ``/openid/v1/jwks`` of the
    apiserver itself, never from a ``jwks_uri`` that could point elsewhere).
    When a fetch fails the known keys stay: a sidecar keeps serving while the
    apiserver is unreachable.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        min_refetch_seconds: float = DEFAULT_MIN_REFETCH_SECONDS,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        on_refresh: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.min_refetch_seconds = min_refetch_seconds
        self.refresh_seconds = refresh_seconds
        self._on_refresh = on_refresh
        self._clock = clock
        self.keys: dict[str, jwk.Key] = {}
        #: The JWK each key in ``keys`` was imported from, to skip re-importing it.
        self._documents: dict[str, dict[str, Any]] = {}
        self.loaded = asyncio.Event()
        #: Bumped whenever the set of keys changes; validators drop cached results.
        self.generation = 0
        self._last_fetch = -1e18
        self._inflight: asyncio.Future[bool] | None = None

    def load(self, document: Mapping[str, Any]) -> bool:
        """Replace the keys with the document's; return whether anything changed.

        A key whose JWK is the same as in the last load keeps its imported object
        (and the ``cryptography`` public key inside it): the periodic refresh does
        not re-import an unchanged set. A kid whose JWK changed is imported anew.
        """
        keys: dict[str, jwk.Key] = {}
        documents: dict[str, dict[str, Any]] = {}
        for raw in document.get("keys") or []:
            if not isinstance(raw, Mapping):
                continue
            kid = raw.get("kid")
            if not isinstance(kid, str) or not kid or raw.get("use", "sig") != "sig":
                continue
            if raw.get("kty") not in ("RSA", "EC"):
                continue
            jwk_doc = dict(raw)
            known = self.keys.get(kid)
            if known is not None and self._documents.get(kid) == jwk_doc:
                keys[kid] = known
                documents[kid] = jwk_doc
                continue
            try:
                keys[kid] = jwk.import_key(dict(jwk_doc))
                documents[kid] = jwk_doc
            except (jose_errors.JoseError, ValueError, TypeError) as exc:
                log.warning("skipping JWKS key %s: %s", kid, type(exc).__name__)
        changed = {k: v.as_dict() for k, v in keys.items()} != {k: v.as_dict() for k, v in self.keys.items()}
        self.keys = keys
        self._documents = documents
        if changed:
            self.generation += 1
        self.loaded.set()
        return changed

    async def refresh(self) -> bool:
        """Fetch now (one fetch at a time); return whether it succeeded."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        ok = False
        try:
            self._last_fetch = self._clock()
            document = await self._fetch()
            changed = self.load(document)
            ok = True
            self._report("changed" if changed else "unchanged")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "JWKS fetch failed, keeping %d known keys: %s: %s",
                len(self.keys),
                type(exc).__name__,
                str(exc)[:200],
            )
            self._report("error")
        finally:
            self._inflight.set_result(ok)
            self._inflight = None
        return ok

    async def refetch_for_unknown_kid(self) -> bool:
        """Refetch unless one happened within ``min_refetch_seconds``."""
        if self._inflight is None and self._clock() - self._last_fetch < self.min_refetch_seconds:
            return False
        return await self.refresh()

    async def run(self) -> None:
        """Forever: refresh periodically (quickly until the first success)."""
        while True:
            ok = await self.refresh()
            await asyncio.sleep(self.refresh_seconds if ok and self.keys else 1.0)

    def _report(self, result: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(result)


class _RepeatedMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A repeated member name is refused: first-wins and last-wins readers would disagree."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _RepeatedMember()
    return out


class _NotJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259), though Python reads them."""
    raise _NotJson(name)


#: The strict reader, built once: ``json.loads`` with hooks builds a new decoder on every call.
_STRICT_JSON: Final = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constants)
#: base64url's two letters to the standard alphabet's, for ``binascii``.
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
#: By padding length: the letters a segment may end with, those whose unused low bits are zero.
#: joserfc refuses any other ending, so that a segment has one encoding only.
_CANONICAL_ENDINGS: Final = ("", "AEIMQUYcgkosw048", "AQgw")


def _b64decode(segment: str) -> bytes:
    """A compact-JWS segment, decoded by joserfc's rules (``joserfc.util.urlsafe_b64decode``).

    The base64url alphabet only, no padding, no ``+``/``/``, and a canonical last
    letter; the tests hold it to joserfc's own function. ``binascii.Error`` (a
    ``ValueError``) otherwise. ``segment`` is ASCII (checked before).
    """
    pad = -len(segment) % 4
    if pad == 3 or "=" in segment or "+" in segment or "/" in segment:
        raise binascii.Error("not base64url")
    if pad and segment[-1] not in _CANONICAL_ENDINGS[pad]:
        raise binascii.Error("not canonical base64url")
    return binascii.a2b_base64(segment.encode().translate(_FROM_URLSAFE) + b"=" * pad, strict_mode=True)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Bytes read as ``json.loads`` reads bytes (the same encoding detection), strictly."""
    try:
        value = _STRICT_JSON.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except _RepeatedMember:
        raise TokenError("malformed", f"token {what} repeats a member name") from None
    except _NotJson:
        raise TokenError("malformed", f"token {what} holds NaN or Infinity, which JSON does not have") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise TokenError("malformed", f"token {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise TokenError("malformed", f"token {what} is not a JSON object")
    return value


def _b64json(segment: str, what: str) -> dict[str, Any]:
    """A segment decoded leniently (padding added, stray letters dropped), then read strictly."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed", f"token {what} is not base64url JSON") from exc
    return _json_object(raw, what)


@dataclass(frozen=True, slots=True)
class _Header:
    """What a protected header says, once it passed every check that depends on it alone."""

    alg: str
    kid: str
    #: joserfc's object for ``alg``: its ``check_key`` and ``verify``.
    algorithm: JWSAlgModel
    #: joserfc would refuse this header (not strict base64url, over its size limit, a name it
    #: does not register or a value of the wrong type). Raised after the key checks, where
    #: joserfc's ``deserialize_compact`` refused it before, so every token keeps its reason.
    flawed: bool


def _read_header(segment: str) -> _Header:
    """The header's own checks, in the order the refusal reasons depend on."""
    flawed = len(segment) > _JOSE_HEADERS.max_header_length
    try:
        fields = _json_object(_b64decode(segment), "header")
    except binascii.Error:
        flawed = True  # joserfc refuses it; the lenient reading still names the first defect
        fields = _b64json(segment, "header")
    alg = fields.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise TokenError(
            "bad_algorithm",
            f"token algorithm {str(alg)[:20]!r} is not accepted; "
            "use a service-account token signed by the apiserver",
        )
    if "crit" in fields or "b64" in fields:
        # RFC 7797 unencoded payloads would let the signature cover one reading of the
        # payload while the claims are taken from another; the apiserver never uses them
        raise TokenError("malformed", "token header uses JWS extensions (crit, b64) that "
                         "service-account tokens never carry")
    kid = fields.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError("unknown_kid", "token header has no key id (kid)")
    if not flawed:
        try:
            _JOSE_HEADERS.check_header(fields)
        except (jose_errors.JoseError, ValueError, TypeError):
            flawed = True
    return _Header(alg=alg, kid=kid, algorithm=_JOSE_ALGORITHMS[alg], flawed=flawed)


class Validator:
    """Validates tokens against one ``Binding`` and a ``KeySet``, with a result cache.

    A cache miss costs one signature check and one strict JSON read of the
    payload: the token is split once, each segment decoded once, and the header
    (the same for every token one key signs) is read and checked once per
    distinct header, and remembered once a token with it was accepted (a few
    dozen at most).
    """

    def __init__(
        self,
        keys: KeySet,
        binding: Binding,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.binding = binding
        self._clock = clock
        self._cache: dict[bytes, Identity] = {}
        self._cache_size = cache_size
        self._cache_generation = keys.generation
        self._headers: dict[str, _Header] = {}

    def cached(self, token: str) -> Identity | None:
        """The fast path: a previous result for this exact token, if still valid."""
        if self._cache_generation != self.keys.generation:
            self._cache.clear()
            self._cache_generation = self.keys.generation
            return None
        if not token.isascii():  # never a JWT; and surrogates from undecodable header bytes cannot be hashed
            return None
        digest = hashlib.sha256(token.encode()).digest()
        identity = self._cache.get(digest)
        if identity is None:
            return None
        if self._clock() > identity.expires_at + self.binding.leeway:
            del self._cache[digest]
            return None
        return identity

    async def validate(self, token: str) -> Identity:
        """Check a token fully (or return the cached result); raise TokenError."""
        identity = self.validate_now(token)
        if identity is not None:
            return identity
        await self.keys.refetch_for_unknown_kid()
        identity = self.validate_now(token)
        if identity is None:
            raise TokenError(
                "unknown_kid",
                "token is signed by a key this cluster does not publish: "
                "use the projected token the kubelet writes for this pod",
            )
        return identity

    def validate_now(self, token: str) -> Identity | None:
        """``validate`` without waiting: None only when the token's ``kid`` is not in the key set.

        The whole check is CPU work once the keys are loaded, so the proxy's
        fast path runs it inside a protocol callback for a first call with a
        new token too; only an unknown ``kid`` needs the JWKS refetch, which
        only ``validate`` may await. Raises TokenError as ``validate`` does.
        """
        identity = self.cached(token)
        if identity is not None:
            return identity
        segments, header = self._parse(token)
        key = self.keys.keys.get(header.kid)
        if key is None:
            return None
        identity = self._verified(segments, header, key)
        self._remember_header(segments[0], header)
        self._remember(token, identity)
        return identity

    def check(self, token: str, key: jwk.Key) -> Identity:
        """Signature and claims of ``token`` against ``key``, without the cache."""
        segments, header = self._parse(token)
        return self._verified(segments, header, key)

    def _parse(self, token: str) -> tuple[list[str], _Header]:
        if not token:
            raise TokenError("missing", "no token: send the pod's token as 'Authorization: Bearer'")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("malformed", "token is too long")
        if not token.isascii():
            raise TokenError("malformed", "token holds characters a JWT never has: send the token file's content")
        segments = token.split(".")
        if len(segments) != 3:
            raise TokenError("malformed", "token is not a signed JWT (expected three '.'-separated parts)")
        header = self._headers.get(segments[0])
        if header is None:
            header = _read_header(segments[0])
        return segments, header

    def _remember_header(self, segment: str, header: _Header) -> None:
        """Keep a header once a token with it was accepted: only headers the cluster's keys signed
        are remembered, so refused tokens cannot crowd the legitimate ones out."""
        if segment in self._headers:
            return
        if len(self._headers) >= _HEADER_MEMO_SIZE:
            del self._headers[next(iter(self._headers))]
        self._headers[segment] = header

    def _verified(self, segments: list[str], header: _Header, key: jwk.Key) -> Identity:
        """The signature by joserfc's algorithm object, then the claims (checked here, not by joserfc).

        The same checks, in the same order, as joserfc's ``deserialize_compact``
        followed by a strict read of the payload: joserfc's size limits, strict
        base64url, its header rules and ``check_key`` (the key's ``use``, type,
        ``alg`` and curve), then ``verify``; the payload's JSON is read only once
        the signature holds.
        """
        alg = header.alg
        key_alg = key.get("alg")
        if key.key_type != _KTY_FOR_ALG[alg[:2]] or (key_alg and key_alg != alg):
            raise TokenError("bad_algorithm", f"token algorithm {alg} does not match its signing key")
        head, body, signature = segments
        try:
            if (
                header.flawed
                or len(signature) > _JOSE_HEADERS.max_signature_length
                or len(body) > _JOSE_HEADERS.max_payload_length
            ):
                raise binascii.Error("refused by joserfc's rules")
            payload = _b64decode(body)
            header.algorithm.check_key(key)
        except (jose_errors.JoseError, ValueError, TypeError):
            raise TokenError("malformed", "token could not be verified") from None
        try:
            raw_signature = _b64decode(signature)
        except ValueError:
            raise TokenError("bad_signature", "token signature is invalid") from None
        try:
            valid = header.algorithm.verify(f"{head}.{body}".encode(), raw_signature, key)
        except (jose_errors.JoseError, ValueError, TypeError):
            raise TokenError("malformed", "token could not be verified") from None
        if not valid:
            raise TokenError("bad_signature", "token signature is invalid")
        return self.check_claims(_json_object(payload, "payload"))

    def check_claims(self, claims: Mapping[str, Any]) -> Identity:
        b = self.binding
        if "kubernetes.io/serviceaccount/namespace" in claims:
            raise TokenError(
                "legacy_token",
                "token is a legacy Secret-based service-account token; "
                "mount a projected serviceAccountToken with audience " + repr(b.audience),
            )
        iss = claims.get("iss")
        if iss != b.issuer:
            raise TokenError("bad_issuer", f"token issuer is {_short(iss)}, expected {b.issuer!r}")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if b.audience not in audiences:
            raise TokenError(
                "bad_audience",
                f"token audience is {_short(aud)}, expected {b.audience!r}: "
                "mount the projected token with that audience",
            )
        now = self._clock()
        exp = _timestamp(claims, "exp", "expiry")
        iat = _timestamp(claims, "iat", "issue time")
        nbf = None if claims.get("nbf") is None else _timestamp(claims, "nbf", "start time")
        if exp < iat:
            raise TokenError("malformed", "token expires (exp) before it was issued (iat)")
        if exp - iat > b.max_lifetime + b.leeway:
            raise TokenError(
                "lifetime_too_long",
                f"token lives {int(exp - iat)} s (exp - iat), longer than the {b.max_lifetime} s a "
                "projected sidekey token can: use the token file the webhook mounts, not one minted by hand",
            )
        if now > exp + b.leeway:
            raise TokenError(
                "expired",
                f"token expired {int(now - exp)} s ago: read the token file on every request, "
                "the kubelet rotates it",
            )
        if nbf is not None and now + b.leeway < nbf:
            raise TokenError("not_yet_valid", "token is not valid yet (nbf in the future)")
        if now + b.leeway < iat:
            raise TokenError("issued_in_future", "token was issued in the future (iat); check clocks")
        k8s = claims.get("kubernetes.io")
        if not _is_object(k8s):
            raise TokenError("not_pod_bound", "token carries no kubernetes.io claims")
        namespace = k8s.get("namespace")
        sa = k8s.get("serviceaccount")
        pod = k8s.get("pod")
        sa_name = sa.get("name") if _is_object(sa) else None
        if not isinstance(sa_name, str) or claims.get("sub") != (
            f"system:serviceaccount:{namespace}:{sa_name}"
        ):
            raise TokenError("malformed", "token subject does not match its service account claims")
        if namespace != b.namespace:
            raise TokenError(
                "wrong_namespace",
                f"token is for namespace {_short(namespace)}, this pod is in {b.namespace!r}",
            )
        if not _is_object(pod):
            raise TokenError(
                "not_pod_bound",
                "token is not bound to a pod: use the projected token the kubelet writes for this pod",
            )
        if pod.get("name") != b.pod_name or pod.get("uid") != b.pod_uid:
            raise TokenError(
                "wrong_pod",
                f"token is bound to pod {_short(pod.get('name'))}, not to this pod "
                f"{b.pod_name!r}: a token works only in the pod it was issued for",
            )
        if b.service_account is not None and sa_name != b.service_account:
            raise TokenError(
                "wrong_service_account",
                f"token is for service account {sa_name!r}, this pod runs as {b.service_account!r}",
            )
        return Identity(
            namespace=b.namespace,
            service_account=sa_name,
            pod_name=b.pod_name,
            pod_uid=b.pod_uid,
            expires_at=float(exp),
        )

    def _remember(self, token: str, identity: Identity) -> None:
        if len(self._cache) >= self._cache_size:
            now = self._clock()
            for k in [k for k, v in self._cache.items() if now > v.expires_at + self.binding.leeway]:
                del self._cache[k]
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[hashlib.sha256(token.encode()).digest()] = identity


def _is_object(value: object) -> TypeGuard[Mapping[str, Any]]:
    """A JSON object: a dict (what the parser makes) without the ABC check's cost, or any Mapping."""
    return type(value) is dict or isinstance(value, Mapping)


def _timestamp(claims: Mapping[str, Any], name: str, what: str) -> float:
    """A required time claim as a number in [0, MAX_TIMESTAMP].

    The range check alone refuses NaN (every comparison is false), infinities and
    integers too big for a float, before anything converts them.
    """
    value = claims.get(name)
    if value is None:
        raise TokenError("malformed", f"token has no {what} ({name})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TIMESTAMP:
        raise TokenError("malformed", f"token {what} ({name}) is not a timestamp: "
                         "a finite number of seconds since 1970")
    return float(value)


def _short(value: object) -> str:
    """A claim value for an error message: bounded, and repr'd so it cannot forge text."""
    return repr(value)[:80]
