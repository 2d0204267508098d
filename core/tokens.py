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
from typing import Any, Final

from joserfc import errors as jose_errors
from joserfc import jwk, jws

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
        self.loaded = asyncio.Event()
        #: Bumped whenever the set of keys changes; validators drop cached results.
        self.generation = 0
        self._last_fetch = -1e18
        self._inflight: asyncio.Future[bool] | None = None

    def load(self, document: Mapping[str, Any]) -> bool:
        """Replace the keys with the document's; return whether anything changed."""
        keys: dict[str, jwk.Key] = {}
        for raw in document.get("keys") or []:
            if not isinstance(raw, Mapping):
                continue
            kid = raw.get("kid")
            if not isinstance(kid, str) or not kid or raw.get("use", "sig") != "sig":
                continue
            if raw.get("kty") not in ("RSA", "EC"):
                continue
            try:
                keys[kid] = jwk.import_key(dict(raw))
            except (jose_errors.JoseError, ValueError, TypeError) as exc:
                log.warning("skipping JWKS key %s: %s", kid, type(exc).__name__)
        changed = {k: v.as_dict() for k, v in keys.items()} != {k: v.as_dict() for k, v in self.keys.items()}
        self.keys = keys
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
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedMember(key)
        out[key] = value
    return out


class _NotJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259), though Python reads them."""
    raise _NotJson(name)


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_unique_members, parse_constant=_no_constants)
    except _RepeatedMember:
        raise TokenError("malformed", f"token {what} repeats a member name") from None
    except _NotJson:
        raise TokenError("malformed", f"token {what} holds NaN or Infinity, which JSON does not have") from None
    except (binascii.Error, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise TokenError("malformed", f"token {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise TokenError("malformed", f"token {what} is not a JSON object")
    return value


class Validator:
    """Validates tokens against one ``Binding`` and a ``KeySet``, with a result cache."""

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
        identity = self.cached(token)
        if identity is not None:
            return identity
        header, alg, kid = self._header(token)
        key = self.keys.keys.get(kid)
        if key is None:
            await self.keys.refetch_for_unknown_kid()
            key = self.keys.keys.get(kid)
            if key is None:
                raise TokenError(
                    "unknown_kid",
                    "token is signed by a key this cluster does not publish: "
                    "use the projected token the kubelet writes for this pod",
                )
        identity = self.check(token, key, header, alg)
        self._remember(token, identity)
        return identity

    def _header(self, token: str) -> tuple[dict[str, Any], str, str]:
        if not token:
            raise TokenError("missing", "no token: send the pod's token as 'Authorization: Bearer'")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("malformed", "token is too long")
        if not token.isascii():
            raise TokenError("malformed", "token holds characters a JWT never has: send the token file's content")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("malformed", "token is not a signed JWT (expected three '.'-separated parts)")
        header = _b64json(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise TokenError(
                "bad_algorithm",
                f"token algorithm {str(alg)[:20]!r} is not accepted; "
                "use a service-account token signed by the apiserver",
            )
        if "crit" in header or "b64" in header:
            # RFC 7797 unencoded payloads would let the signature cover one reading of the
            # payload while the claims are taken from another; the apiserver never uses them
            raise TokenError("malformed", "token header uses JWS extensions (crit, b64) that "
                             "service-account tokens never carry")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("unknown_kid", "token header has no key id (kid)")
        return header, alg, kid

    def check(self, token: str, key: jwk.Key, header: Mapping[str, Any], alg: str) -> Identity:
        """Signature and claims, without the cache (the claims are checked here, not by joserfc)."""
        key_alg = key.get("alg")
        if key.key_type != _KTY_FOR_ALG[alg[:2]] or (key_alg and key_alg != alg):
            raise TokenError("bad_algorithm", f"token algorithm {alg} does not match its signing key")
        try:
            obj = jws.deserialize_compact(token, key, algorithms=[alg])
        except jose_errors.BadSignatureError:
            raise TokenError("bad_signature", "token signature is invalid") from None
        except (jose_errors.JoseError, ValueError, TypeError):
            raise TokenError("malformed", "token could not be verified") from None
        claims = _b64json(token.split(".")[1], "payload")
        del obj
        return self.check_claims(claims)

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
        if not isinstance(k8s, Mapping):
            raise TokenError("not_pod_bound", "token carries no kubernetes.io claims")
        namespace = k8s.get("namespace")
        sa = k8s.get("serviceaccount")
        pod = k8s.get("pod")
        sa_name = sa.get("name") if isinstance(sa, Mapping) else None
        if not isinstance(sa_name, str) or claims.get("sub") != (
            f"system:serviceaccount:{namespace}:{sa_name}"
        ):
            raise TokenError("malformed", "token subject does not match its service account claims")
        if namespace != b.namespace:
            raise TokenError(
                "wrong_namespace",
                f"token is for namespace {_short(namespace)}, this pod is in {b.namespace!r}",
            )
        if not isinstance(pod, Mapping):
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


def _timestamp(claims: Mapping[str, Any], name: str, what: str) -> float:
    """A required time claim as a number in [0, MAX_TIMESTAMP].

    The range check alone refuses NaN (every comparison is false), infinities and
    integers too big for a float, before anything converts them.
    """
    value = claims.get(name)
    if value is None:
        raise TokenError("malformed", f"token has no {what} ({name})")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TIMESTAMP:
        raise TokenError("malformed", f"token {what} ({name}) is not a timestamp: "
                         "a finite number of seconds since 1970")
    return float(value)


def _short(value: object) -> str:
    """A claim value for an error message: bounded, and repr'd so it cannot forge text."""
    return repr(value)[:80]
