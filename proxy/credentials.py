"""The upstream credential: read from a Secret, attached per the policy's auth type.

Everything that can be computed when a Secret or policy changes is computed
then (the header to set, the query parameter, the scrubber), so a request
only copies a prepared tuple. OAuth2 client credentials (RFC 6749 §4.4) are
exchanged for an access token over the sidecar's small control-plane client
(``core.httpclient``, behind the same host checks as the upstreams: authlib's
clients would pull httpx or requests into every agent pod, aiohttp 14 MB); the
token is cached and refreshed before it expires, so the upstream too only ever
sees a short-lived credential.

The token URL is its own TLS peer, usually a public IdP apart from the
upstream: it is verified against the system store, or against its own
``oauth2ClientCredentials.caBundle``, never with the upstream's context. The
upstream's ``caBundle`` names the CA of a private upstream, which a public IdP
does not have, and an ``insecure`` (plain-http) upstream has no context at
all: borrowing it sent the client secret to an unverified https token URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote_plus, urlencode

from sidekey.core import errors, httpclient, policies
from sidekey.proxy import scrubbing

log = logging.getLogger("sidekey.proxy.credentials")

_HEADER_SAFE: Final = re.compile(r"^[\x20-\x7e\x80-\xff]*\Z")  # \Z: "$" also matches before a final "\n"
#: Refresh an OAuth2 token this long before it expires (or at 80% of its life if shorter).
OAUTH_REFRESH_MARGIN: Final = 60.0
OAUTH_DEFAULT_LIFETIME: Final = 3600.0
#: A token answer larger than this is refused unread: every sidecar holds what it reads.
OAUTH_MAX_ANSWER_BYTES: Final = 64 * 1024
#: The longest lifetime believed: an access token is refreshed at least this often.
OAUTH_MAX_LIFETIME: Final = 86400.0
#: The longest silence of a token endpoint (connect, then each read).
OAUTH_TIMEOUT: Final = 30.0


def token_client(resolve: httpclient.Resolve | None = None) -> httpclient.Client:
    """The client the OAuth2 token calls go over; ``resolve`` checks where a token URL's name points."""
    return httpclient.Client(resolve=resolve, idle_per_origin=2,
                             connect_timeout=OAUTH_TIMEOUT, read_timeout=OAUTH_TIMEOUT)


class CredentialError(errors.Unavailable):
    """The credential cannot be built or fetched; ``status`` is 503 or 502."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


#: Stands for a Secret value that is not UTF-8 text, so the error can say so
#: instead of "no such key". It can never be a real value (NUL is refused).
NOT_TEXT: Final = "\x00not-utf-8"


def decode_secret(obj: Mapping[str, Any]) -> dict[str, str]:
    """The Secret's ``data`` as text; a value that is not UTF-8 becomes ``NOT_TEXT``."""
    out: dict[str, str] = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            text = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
            out[key] = NOT_TEXT
            continue
        out[key] = text.rstrip("\r\n")  # files often end in a newline the key never had
    for key, value in (obj.get("stringData") or {}).items():
        if isinstance(value, str):
            out.setdefault(key, value.rstrip("\r\n"))
    return out


def _value(auth: policies.Auth, data: Mapping[str, str] | None, key: str | None) -> str:
    if data is None:
        raise CredentialError(f"Secret {auth.secret_name!r} does not exist or cannot be read")
    assert key is not None
    value = data.get(key)
    if not value:
        raise CredentialError(f"Secret {auth.secret_name!r} has no key {key!r} (or it is empty)")
    if value is NOT_TEXT:
        raise CredentialError(
            f"Secret {auth.secret_name!r} key {key!r} is not UTF-8 text; store the key as text"
        )
    if not _HEADER_SAFE.match(value):
        raise CredentialError(
            f"Secret {auth.secret_name!r} key {key!r} holds control characters, "
            "which cannot be sent in a request"
        )
    return value


@dataclass(frozen=True, slots=True)
class Credential:
    """What to attach for one route, precomputed; ``oauth`` fetches at request time."""

    headers: tuple[tuple[str, str], ...]
    query: tuple[str, str] | None
    scrubber: scrubbing.Scrubber
    oauth: OAuthClient | None = None


def verifying_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A context that verifies against ``ca_bundle`` alone, or the system store without one."""
    return ssl.create_default_context(cadata=ca_bundle) if ca_bundle is not None else ssl.create_default_context()


def build(
    auth: policies.Auth,
    data: Mapping[str, str] | None,
    *,
    insecure: bool = False,
    tls: Callable[[str | None], ssl.SSLContext] = verifying_context,
) -> Credential:
    """Prepare the credential for ``auth`` from decoded Secret data; raise CredentialError.

    ``insecure`` (the upstream's flag) only lets an OAuth2 token URL be plain
    http, as the upstream is; it never turns off the verification of an https
    one. ``tls`` makes the token URL's verifying context from its own bundle
    (the routes pass their cache: loading the system store is slow).
    """
    kind = auth.type
    if kind == "bearer":
        key = _value(auth, data, auth.key)
        return Credential((("Authorization", f"Bearer {key}"),), None, scrubbing.Scrubber([key]))
    if kind == "header":
        key = _value(auth, data, auth.key)
        return Credential(
            ((auth.header_name, f"{auth.header_prefix}{key}"),), None, scrubbing.Scrubber([key])
        )
    if kind == "query":
        key = _value(auth, data, auth.key)
        assert auth.query_param is not None
        return Credential((), (auth.query_param, quote_plus(key)), scrubbing.Scrubber([key]))
    if kind == "basic":
        user = _value(auth, data, auth.username_key)
        password = _value(auth, data, auth.password_key)
        pair = f"{user}:{password}"
        token = base64.b64encode(pair.encode()).decode()
        # the username alone is not secret; the password and the pair are
        return Credential(
            (("Authorization", f"Basic {token}"),), None, scrubbing.Scrubber([password, pair, token])
        )
    client_id = _value(auth, data, auth.client_id_key)
    client_secret = _value(auth, data, auth.client_secret_key)
    assert auth.token_url is not None
    context: ssl.SSLContext | None = None
    if auth.token_url.startswith("http://"):
        if not insecure:
            raise CredentialError("the OAuth2 tokenURL must use https (or the upstream must be insecure)")
    else:
        try:
            context = tls(auth.token_ca_bundle)
        except (ssl.SSLError, ValueError):
            raise CredentialError("the oauth2ClientCredentials.caBundle holds no usable PEM certificate") from None
    client = OAuthClient(auth.token_url, client_id, client_secret, auth.scopes, auth.audience,
                         context=context, ca_bundle=auth.token_ca_bundle)
    return Credential((), None, scrubbing.Scrubber([client_secret]), oauth=client)


class OAuthClient:
    """Client-credentials grant with a cached access token (one fetch at a time).

    ``context`` verifies an https token URL (see the module docstring); it is
    None only for a plain-http one, which only an insecure upstream may have.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scopes: tuple[str, ...],
        audience: str | None,
        *,
        context: ssl.SSLContext | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        if context is None and not token_url.startswith("http://"):
            context = verifying_context(ca_bundle)
        self.token_url = token_url
        self.context = context
        self._ca_bundle = ca_bundle
        self._client_id = client_id
        self._client_secret = client_secret
        self._scopes = scopes
        self._audience = audience
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.scrubber = scrubbing.Scrubber([client_secret])
        self.fetches = 0

    def same_as(self, other: OAuthClient) -> bool:
        """Keep the cached token across reloads when nothing it depends on changed."""
        mine = (self.token_url, self._client_id, self._client_secret, self._scopes, self._audience, self._ca_bundle)
        return mine == (
            other.token_url,
            other._client_id,
            other._client_secret,
            other._scopes,
            other._audience,
            other._ca_bundle,
        )

    def adopt(self, other: OAuthClient) -> None:
        self._token, self._refresh_at, self._expires_at = other._token, other._refresh_at, other._expires_at
        self.scrubber = other.scrubber

    async def token(self, http: httpclient.Client) -> str:
        """The access token, fetched (over ``http``) or refreshed when due.

        The token URL is verified with ``self.context`` whatever the upstream
        uses; ``http`` only carries the connection (and refuses local addresses).
        """
        now = time.monotonic()
        if self._token is not None and now < self._refresh_at:
            return self._token
        async with self._lock:
            now = time.monotonic()
            if self._token is not None and now < self._refresh_at:
                return self._token
            try:
                await self._fetch(http)
            except CredentialError:
                if self._token is not None and now < self._expires_at:
                    log.warning("OAuth2 token refresh failed; using the current token until it expires")
                    return self._token
                raise
            assert self._token is not None
            return self._token

    async def _fetch(self, http: httpclient.Client) -> None:
        form = {"grant_type": "client_credentials"}
        if self._scopes:
            form["scope"] = " ".join(self._scopes)
        if self._audience:
            form["audience"] = self._audience
        basic = base64.b64encode(
            f"{quote_plus(self._client_id)}:{quote_plus(self._client_secret)}".encode()
        ).decode()
        headers = [("Authorization", f"Basic {basic}"), ("Accept", "application/json"),
                   ("Content-Type", "application/x-www-form-urlencoded")]
        self.fetches += 1
        try:
            # no redirects: the client follows none (the secret must not travel on)
            resp = await http.request("POST", self.token_url, headers=headers, body=urlencode(form).encode(),
                                      tls=self.context, limit=OAUTH_MAX_ANSWER_BYTES)
        except httpclient.BodyTooLarge:
            raise CredentialError("the OAuth2 token endpoint's answer is too large for a token", 502) from None
        except (httpclient.HttpError, TimeoutError, OSError, ValueError) as exc:
            raise CredentialError(
                f"the OAuth2 token endpoint is unreachable ({type(exc).__name__})", 502
            ) from None
        status, body = resp.status, resp.body
        if status != 200:
            raise CredentialError(f"the OAuth2 token endpoint answered {status}", 502)
        try:
            doc = json.loads(body)
            token = doc["access_token"]
            lifetime = _lifetime(doc.get("expires_in"))
        except (ValueError, KeyError, TypeError):
            raise CredentialError("the OAuth2 token endpoint returned no access_token", 502) from None
        if not isinstance(token, str) or not token or not _HEADER_SAFE.match(token):
            raise CredentialError("the OAuth2 token endpoint returned an unusable access_token", 502)
        now = time.monotonic()
        self._token = token
        self._expires_at = now + lifetime
        self._refresh_at = now + max(lifetime - OAUTH_REFRESH_MARGIN, lifetime * 0.8)
        self.scrubber = scrubbing.Scrubber([self._client_secret, token])


def _lifetime(expires_in: object) -> float:
    """``expires_in`` as seconds in (0, OAUTH_MAX_LIFETIME]; absent or no lifetime: the default.

    RFC 6749 makes it a positive number, but an IdP's answer is not ours: NaN or
    a negative number would refetch on every request, infinity keep the token
    past its real end for good (Python reads NaN, Infinity and 1e400 as floats).
    """
    try:
        seconds = float(expires_in) if isinstance(expires_in, int | float | str) else 0.0
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:  # NaN fails every comparison
        return OAUTH_DEFAULT_LIFETIME
    return min(seconds, OAUTH_MAX_LIFETIME)
