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
OpenSSL and one strict read of the payload, little else: the token is split
once and each segment decoded once, with joserfc's strict base64url rules; the
header, the same for every token a key signs, is checked once (joserfc's
header rules included) and remembered once a token with it was accepted;
unchanged JWKs keep their imported keys across refreshes.

The signatures are checked by the system's libcrypto, the same OpenSSL 3 that
Python's ``ssl`` and ``hashlib`` already loaded, called through ``ctypes``
(core/openssl.py: the EVP API, with each JWK's numbers turned into a DER
SubjectPublicKeyInfo parsed once), not by ``cryptography``: every agent pod
pays the sidecar's memory, and importing cryptography's Rust binding cost each
sidecar 7.8 MB of RSS, 2 MB of it anonymous (an idle sidecar: 38.3 MB, RssAnon
18.6 MB with it; 30.4 and 16.6 MB without), where ``ctypes`` and the library
already mapped add 0.5 MB. A 2048-bit RSA check takes no longer either way
(pure Python's ``pow`` alone would take 270 µs). ``cryptography`` is imported only to read the rare
JWK with private members, which joserfc reads as a private key that must be
consistent. Neither is joserfc imported: it cost 2.3 MB more, nearly all of it
private (80 modules: its PEM module loads ``cryptography.x509``, ``email`` and
``zlib``), none of which a JWKS of bare public numbers needs. What joserfc did
is kept, as data declared once below: its registered header names and their
types, its size limits, its JWK member rules, its key checks (``use``,
``key_ops``, ``alg``, curve), the public-number checks of the cryptography it
imported keys with, and its signature schemes (PSS with the digest's length
as salt, ES signatures as raw ``r || s`` of the curve's size). joserfc stays
the reference: the checks and their order are those of its
``deserialize_compact`` followed by the claims,
tests/core/test_tokens_joserfc_parity.py holds every token's outcome to
joserfc's, and test_tokens_cryptography_parity.py holds these tables to
joserfc's registries and every JWK's import to its ``jwk.import_key``.

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

from sidekey.core import errors, openssl

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

# --- joserfc's rules, as data ---------------------------------------------------------------------
# Copied from joserfc 1.x (registry.py, _rfc7515/registry.py, _rfc7517/models.py, _rfc7518/*) and
# held to it by tests/core/test_tokens_joserfc_parity.py: a value a rule here refuses is one
# joserfc raised on, and the reverse.

#: A JSON value's check: true when joserfc's validator of that name accepts it.
Rule = Callable[[object], bool]


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_json_object(value: object) -> bool:
    return isinstance(value, dict)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _never(value: object) -> bool:
    """A member joserfc refuses whatever its value (``oth``: multi-prime RSA, which it does not support)."""
    return False


def _one_of(*choices: str) -> Rule:
    """One of ``choices``, or a list of them (joserfc's ``in_choices``; a string is not split)."""
    def valid(value: object) -> bool:
        if isinstance(value, list):
            return all(item in choices for item in value)
        return value in choices
    return valid


#: The registered JWS header names (RFC 7515 section 4.1, and RFC 7797's ``b64``) with the type
#: of each (joserfc's ``JWS_HEADER_REGISTRY``). joserfc's strict check refuses a header with any
#: other name or a value of another type. ``crit`` and ``b64`` are refused before this table is
#: read (``_read_header``), so joserfc's checks of what ``crit`` names never come into play.
_JWS_HEADER_MEMBERS: Final[Mapping[str, Rule]] = {
    "alg": _is_str, "jku": _is_url, "jwk": _is_json_object, "kid": _is_str, "x5u": _is_url,
    "x5c": _is_str_list, "x5t": _is_str, "x5t#S256": _is_str, "typ": _is_str, "cty": _is_str,
    "crit": _is_str_list, "b64": _is_bool,
}
#: joserfc's limits on the encoded segments, in characters (``JWSRegistry.max_*_length``).
_MAX_HEADER_SEGMENT: Final = 512
#: Never reached while ``MAX_TOKEN_BYTES`` is lower; kept so that raising that stays safe.
_MAX_PAYLOAD_SEGMENT: Final = 128_000
_MAX_SIGNATURE_SEGMENT: Final = 1024

#: The JWK members joserfc checks on import, each ``name: (required, rule)``: the members of
#: every key (``JWK_PARAMETER_REGISTRY``), then those of its type (``value_registry``). Members
#: not listed are ignored, as joserfc ignores them.
_JWK_MEMBERS: Final[Mapping[str, tuple[bool, Rule]]] = {
    "kty": (True, _is_str),
    "use": (False, _one_of("sig", "enc")),
    "key_ops": (False, _one_of("sign", "verify", "encrypt", "decrypt", "wrapKey", "unwrapKey",
                               "deriveKey", "deriveBits")),
    "alg": (False, _is_str), "kid": (False, _is_str), "x5u": (False, _is_url), "x5c": (False, _is_str_list),
    "x5t": (False, _is_str), "x5t#S256": (False, _is_str),
}
_KEY_TYPE_MEMBERS: Final[Mapping[str, Mapping[str, tuple[bool, Rule]]]] = {
    "RSA": {"n": (True, _is_str), "e": (True, _is_str), "d": (False, _is_str), "p": (False, _is_str),
            "q": (False, _is_str), "dp": (False, _is_str), "dq": (False, _is_str), "qi": (False, _is_str),
            "oth": (False, _never)},
    "EC": {"crv": (True, _is_str), "x": (True, _is_str), "y": (True, _is_str), "d": (False, _is_str)},
}
#: The members that are private key material: a JWKS that has one publishes a signing key.
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
#: The ``key_ops`` a JWK's ``use`` allows, when it has both.
_USE_OPERATIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "sig": ("sign", "verify"),
    "enc": ("encrypt", "decrypt", "wrapKey", "unwrapKey", "deriveKey", "deriveBits"),
}


@dataclass(frozen=True, slots=True)
class _Curve:
    #: The named curve's OID, DER-encoded (RFC 5480 section 2.1.1.1).
    oid: bytes
    #: Bytes of each coordinate of a point, and of each of ``r`` and ``s`` in a JWS signature
    #: (RFC 7518 section 3.4).
    size: int
    #: cryptography's name of the curve, for the rare JWK with a private member.
    name: str


_CURVES: Final[Mapping[str, _Curve]] = {
    "P-256": _Curve(bytes.fromhex("06082a8648ce3d030107"), 32, "SECP256R1"),
    "P-384": _Curve(bytes.fromhex("06052b81040022"), 48, "SECP384R1"),
    "P-521": _Curve(bytes.fromhex("06052b81040023"), 66, "SECP521R1"),
}


class JWKError(ValueError):
    """A JWK this validator cannot use; the message names the member at fault, never a value."""


@dataclass(frozen=True, slots=True, eq=False)
class PublicKey:
    """One JWKS key, imported: what checking a token against it needs (joserfc's key checks)."""

    #: The JWK as published.
    document: Mapping[str, Any]
    #: The public key, parsed by OpenSSL from its DER SubjectPublicKeyInfo.
    public: openssl.PublicKey
    #: ``RSA`` or ``EC``.
    key_type: str
    #: The algorithm the JWK names, or ``""`` for any of its type.
    alg: str
    #: The curve of an EC key (``P-256`` ...), None for RSA.
    curve: str | None
    #: Its ``use`` allows signatures (absent or ``sig``).
    signs: bool
    #: Its ``key_ops`` allow verifying (absent, or naming ``verify``).
    may_verify: bool

    def get(self, name: str, default: Any = None) -> Any:
        """A member of the JWK, as joserfc's keys answer ``key.get("alg")``."""
        return self.document.get(name, default)


def _b64int(value: str) -> int:
    """A JWK number: strict base64url of at least one byte, big-endian (joserfc's ``base64_to_int``)."""
    if not value.isascii():
        raise JWKError("a number is not base64url")
    try:
        raw = _b64decode(value)
    except ValueError:
        raise JWKError("a number is not strict base64url (no padding, no '+' or '/')") from None
    if not raw:
        raise JWKError("a number is empty")
    return int.from_bytes(raw, "big")


def import_jwk(document: Mapping[str, Any]) -> PublicKey:
    """A JWK read as joserfc's ``jwk.import_key`` reads it: the same members checked, the same keys refused.

    Raises ValueError (JWKError naming the member at fault; or, for a JWK with private members,
    cryptography's). A JWK with private members (``d``, the RSA primes) is used as joserfc uses
    it, as a private key that must be consistent, and is refused when it is not; only its public
    key is kept.
    """
    kty = document.get("kty")
    if not isinstance(kty, str) or kty not in _KEY_TYPE_MEMBERS:
        raise JWKError("kty must be RSA or EC")
    for name, (required, valid) in (*_JWK_MEMBERS.items(), *_KEY_TYPE_MEMBERS[kty].items()):
        if name in document:
            if not valid(document[name]):
                raise JWKError(f"member {name!r} has a value of the wrong type or one not allowed")
        elif required:
            raise JWKError(f"member {name!r} is missing")
    use: Any = document.get("use")
    key_ops: Any = document.get("key_ops")  # a list or a string (checked above)
    if "use" in document and "key_ops" in document:
        allowed = _USE_OPERATIONS.get(use) if isinstance(use, str) else None
        # a key_ops string is iterated letter by letter, as joserfc iterates it: never allowed
        if allowed is None or any(op not in allowed for op in key_ops):
            raise JWKError("key_ops names operations its use does not allow")
    curve = None
    if kty == "RSA":
        public = _rsa_public_key(document)
    else:
        curve = document["crv"]
        public = _ec_public_key(document)
    return PublicKey(
        document=document, public=public, key_type=kty, alg=document.get("alg") or "", curve=curve,
        # a key_ops string is searched as a string ("verify" in "verify"), as joserfc does
        signs=not use or use == "sig", may_verify=key_ops is None or "verify" in key_ops,
    )


def _rsa_public_key(document: Mapping[str, Any]) -> openssl.PublicKey:
    e, n = _b64int(document["e"]), _b64int(document["n"])
    if "d" in document:
        n, e = _private_rsa_numbers(document, n, e)
    # cryptography's checks of public numbers (RSAPublicNumbers.public_key), which joserfc relied on;
    # an even n is not refused there, and OpenSSL then fails every signature
    if n < 3:
        raise JWKError("member 'n' must be at least 3")
    if not 3 <= e < n:
        raise JWKError("member 'e' must be at least 3 and less than n")
    if not e & 1:
        raise JWKError("member 'e' must be odd")
    try:
        return openssl.PublicKey(openssl.rsa_spki(n, e))
    except openssl.RefusedKey:
        raise JWKError("members 'n' and 'e' make no RSA key OpenSSL reads") from None


def _ec_public_key(document: Mapping[str, Any]) -> openssl.PublicKey:
    curve = _CURVES.get(document["crv"])
    if curve is None:
        raise JWKError("crv must be P-256, P-384 or P-521")
    x, y = _b64int(document["x"]), _b64int(document["y"])
    if "d" in document:
        x, y = _private_ec_numbers(document, curve, x, y)
    try:
        der = openssl.ec_spki(curve.oid, curve.size, x, y)
    except OverflowError:
        raise JWKError(f"member 'x' or 'y' is longer than a coordinate of {document['crv']}") from None
    try:
        # d2i_PUBKEY refuses a coordinate not below the field's prime and a point off the curve
        # (tests/core/test_openssl.py); the public check adds the point's order
        return openssl.PublicKey(der, check=True)
    except openssl.RefusedKey:
        raise JWKError(f"members 'x' and 'y' are not a point of {document['crv']}") from None


def _private_rsa_numbers(document: Mapping[str, Any], n: int, e: int) -> tuple[int, int]:
    """``(n, e)`` of a JWK with private members, read as joserfc reads it: a private key that must
    be consistent (cryptography checks it), whose own public key is kept.

    Only such a JWK, which publishes a signing key and never comes from a healthy apiserver,
    imports ``cryptography``; the sidecar otherwise never loads it (7.8 MB of RSS).
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.RSAPublicNumbers(e, n)
    primes = [name in document for name in ("p", "q", "dp", "dq", "qi")]
    d = _b64int(document["d"])
    if all(primes):
        p, q = _b64int(document["p"]), _b64int(document["q"])
        dmp1, dmq1, iqmp = _b64int(document["dp"]), _b64int(document["dq"]), _b64int(document["qi"])
    elif any(primes):
        raise JWKError("an RSA key with any of p, q, dp, dq, qi must have them all")
    else:
        p, q = rsa.rsa_recover_prime_factors(numbers.n, numbers.e, d)
        dmp1, dmq1, iqmp = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
    public = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, numbers).private_key().public_key().public_numbers()
    return public.n, public.e


def _private_ec_numbers(document: Mapping[str, Any], curve: _Curve, x: int, y: int) -> tuple[int, int]:
    """``(x, y)`` of an EC JWK with ``d``: the private key's own public key, as joserfc verifies with
    (cryptography checks that ``d`` makes that point); ``cryptography`` is imported only here."""
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.EllipticCurvePublicNumbers(x, y, getattr(ec, curve.name)())
    public = ec.EllipticCurvePrivateNumbers(_b64int(document["d"]), numbers).private_key().public_key()
    point = public.public_numbers()
    return point.x, point.y

class _KeyOpsRefused(ValueError):
    """The key's ``key_ops`` do not allow verifying (joserfc's ``UnsupportedKeyOperationError``)."""


@dataclass(frozen=True, slots=True)
class _RSAScheme:
    """RS* (PKCS #1 v1.5) and PS* (PSS): joserfc's ``RSAAlgorithm`` and ``RSAPSSAlgorithm``."""

    name: str
    digest: openssl.Digest
    #: PSS as joserfc verifies it: MGF1 of the same digest, a salt exactly the digest's length.
    pss: bool
    #: RSA keys have no curve to match.
    curve: None = None

    def verify(self, key: PublicKey, message: bytes, signature: bytes) -> bool:
        if not key.may_verify:
            raise _KeyOpsRefused()
        if key.key_type != "RSA":  # the key type was checked before
            raise TypeError("not an RSA key")
        if len(signature) != key.public.size:
            # RFC 8017, 8.2.2 step 1: any other length is invalid. OpenSSL alone would read a
            # shorter one as the same number with leading zeros (one PSS signature in 256 lost
            # its first byte, a zero, and still verified)
            return False
        return key.public.verify(self.digest, message, signature, pss=self.pss)


@dataclass(frozen=True, slots=True)
class _ECScheme:
    """ES*: the signature is ``r || s``, each of the curve's size (joserfc's ``ESAlgorithm``)."""

    name: str
    #: The curve the key must be on.
    curve: str
    digest: openssl.Digest

    def verify(self, key: PublicKey, message: bytes, signature: bytes) -> bool:
        size = _CURVES[self.curve].size
        if len(signature) != 2 * size:  # before key_ops, as in joserfc
            return False
        if not key.may_verify:
            raise _KeyOpsRefused()
        if key.key_type != "EC":
            raise TypeError("not an EC key")
        # r or s of zero, or not below the group's order, is a signature OpenSSL refuses
        der = openssl.ecdsa_signature(signature[:size], signature[size:])
        return key.public.verify(self.digest, message, der)


#: Every allowed ``alg``, with its scheme.
_ALGORITHMS: Final[Mapping[str, _RSAScheme | _ECScheme]] = {
    "RS256": _RSAScheme("RS256", openssl.SHA256, pss=False),
    "RS384": _RSAScheme("RS384", openssl.SHA384, pss=False),
    "RS512": _RSAScheme("RS512", openssl.SHA512, pss=False),
    "PS256": _RSAScheme("PS256", openssl.SHA256, pss=True),
    "PS384": _RSAScheme("PS384", openssl.SHA384, pss=True),
    "PS512": _RSAScheme("PS512", openssl.SHA512, pss=True),
    "ES256": _ECScheme("ES256", "P-256", openssl.SHA256),
    "ES384": _ECScheme("ES384", "P-384", openssl.SHA384),
    "ES512": _ECScheme("ES512", "P-521", openssl.SHA512),
}
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


@dataclass(frozen=True, slots=True, eq=False)
class LastToken:
    """The token one agent connection sent last, and what its check found.

    An agent sends the same token on every request of a connection until the
    kubelet rotates it, so the sidecar's fast path keeps the check next to the
    connection and skips even the SHA-256 of the cache lookup (27k of 296k
    instructions a request, measured under callgrind). The rule for using it is
    the cache's, kept here with it (``Validator.again``): the same validator, the
    same key-set generation (a rotation drops it as it clears the cache), and
    the token's lifetime with the leeway. The token is compared only with what
    the same connection sends next, so the compare's timing tells no other
    caller anything; nothing here is ever logged.
    """

    validator: Validator
    generation: int
    token: str
    until: float
    identity: Identity


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
        self.keys: dict[str, PublicKey] = {}
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
        (and the OpenSSL public key inside it): the periodic refresh does
        not re-import an unchanged set. A kid whose JWK changed is imported anew.
        A JWK that makes no key is skipped with a warning; the others still load.
        """
        keys: dict[str, PublicKey] = {}
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
                keys[kid] = import_jwk(jwk_doc)
                documents[kid] = jwk_doc
            except (ValueError, TypeError) as exc:
                # our own messages name the member; cryptography's could quote the numbers
                log.warning("skipping JWKS key %s: %s", kid, exc if isinstance(exc, JWKError) else type(exc).__name__)
                continue
            if not _PRIVATE_MEMBERS.isdisjoint(jwk_doc):
                log.warning("JWKS key %s publishes private key members (%s): whoever reads the JWKS can sign "
                            "tokens; rotate the service-account signing key", kid,
                            ", ".join(sorted(_PRIVATE_MEMBERS.intersection(jwk_doc))))
        changed = documents != self._documents
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
    #: How ``alg`` verifies, and the key it needs.
    algorithm: _RSAScheme | _ECScheme
    #: joserfc would refuse this header (not strict base64url, over its size limit, a name it
    #: does not register or a value of the wrong type). Raised after the key checks, where
    #: joserfc's ``deserialize_compact`` refused it before, so every token keeps its reason.
    flawed: bool


def _read_header(segment: str) -> _Header:
    """The header's own checks, in the order the refusal reasons depend on."""
    flawed = len(segment) > _MAX_HEADER_SEGMENT
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
        flawed = not _registered_header(fields)
    return _Header(alg=alg, kid=kid, algorithm=_ALGORITHMS[alg], flawed=flawed)


def _registered_header(fields: Mapping[str, Any]) -> bool:
    """joserfc's strict header check: every name a registered one, each value of its type."""
    for name, value in fields.items():
        valid = _JWS_HEADER_MEMBERS.get(name)
        if valid is None or not valid(value):
            return False
    return True


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

    def again(self, last: LastToken | None, token: str) -> Identity | None:
        """``cached`` for the token a connection sent last: its identity while that check holds."""
        if (last is not None and last.token == token and last.validator is self
                and last.generation == self.keys.generation and self._clock() <= last.until):
            return last.identity
        return None

    def last(self, token: str, identity: Identity) -> LastToken:
        """What a connection keeps of the token it just sent, once checked (see ``again``)."""
        return LastToken(self, self.keys.generation, token, identity.expires_at + self.binding.leeway, identity)

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

    def check(self, token: str, key: PublicKey) -> Identity:
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

    def _verified(self, segments: list[str], header: _Header, key: PublicKey) -> Identity:
        """The signature, then the claims.

        The same checks, in the same order, as joserfc's ``deserialize_compact``
        followed by a strict read of the payload: its size limits, strict
        base64url, its header rules and ``check_key`` (the key's ``use``, type,
        ``alg`` and curve), then its ``verify`` (``key_ops``, the signature);
        the payload's JSON is read only once the signature holds.
        """
        alg = header.alg
        algorithm = header.algorithm
        if key.key_type != _KTY_FOR_ALG[alg[:2]] or (key.alg and key.alg != alg):
            raise TokenError("bad_algorithm", f"token algorithm {alg} does not match its signing key")
        head, body, signature = segments
        if (
            header.flawed
            or len(signature) > _MAX_SIGNATURE_SEGMENT
            or len(body) > _MAX_PAYLOAD_SEGMENT
            or not key.signs
            or key.curve != algorithm.curve
        ):
            raise TokenError("malformed", "token could not be verified")
        try:
            payload = _b64decode(body)
        except ValueError:
            raise TokenError("malformed", "token could not be verified") from None
        try:
            raw_signature = _b64decode(signature)
        except ValueError:
            raise TokenError("bad_signature", "token signature is invalid") from None
        try:
            valid = algorithm.verify(key, f"{head}.{body}".encode(), raw_signature)
        except (ValueError, TypeError):  # _KeyOpsRefused: the key may not verify
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
