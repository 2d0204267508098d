"""The AgentPolicy model: parse, validate, select and match.

The CRD's OpenAPI schema and CEL rules refuse most bad manifests at the
apiserver, but every reader (operator, webhook, sidecar) parses the object
again here: the schema may be older than the reader, and a parse error must
become a status condition or a clear refusal, never a crash. Parsing returns
frozen dataclasses so no component passes loose dicts around.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict, cast, get_args
from urllib.parse import urlsplit

from sidekey.core import contract, errors, llmpolicy

AuthType = Literal["bearer", "header", "basic", "query", "oauth2ClientCredentials"]
AUTH_TYPES: Final[tuple[str, ...]] = get_args(AuthType)
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

DEFAULT_MAX_REQUEST_BYTES: Final = 10 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS: Final = 600

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+\Z")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@-]+\Z")


# --- Raw shapes, as the apiserver serves them ---------------------------------


class RawSecretRef(TypedDict, total=False):
    name: str
    key: str


class RawHeader(TypedDict, total=False):
    name: str
    prefix: str


class RawBasic(TypedDict, total=False):
    usernameKey: str
    passwordKey: str


class RawQuery(TypedDict, total=False):
    param: str


class RawOAuth2(TypedDict, total=False):
    tokenURL: str
    clientIdKey: str
    clientSecretKey: str
    scopes: list[str]
    audience: str
    caBundle: str


class RawAuth(TypedDict, total=False):
    type: str
    secretRef: RawSecretRef
    header: RawHeader
    basic: RawBasic
    query: RawQuery
    oauth2ClientCredentials: RawOAuth2


class RawAllowRule(TypedDict, total=False):
    methods: list[str]
    paths: list[str]


class RawLimits(TypedDict, total=False):
    requestsPerMinute: int
    maxRequestBytes: int
    timeoutSeconds: int


class RawEnvVar(TypedDict, total=False):
    name: str
    suffix: str


class RawBudget(TypedDict, total=False):
    tokens: int
    window: str
    scope: str


class RawUpstream(TypedDict, total=False):
    name: str
    url: str
    insecure: bool
    auth: RawAuth
    allow: list[RawAllowRule]
    limits: RawLimits
    caBundle: str
    env: list[RawEnvVar]
    api: str  # LLM fields: see core/llmpolicy.py
    models: list[str]
    budgets: list[RawBudget]
    capMaxTokens: bool


class RawSubjects(TypedDict, total=False):
    serviceAccounts: list[str]


class RawToken(TypedDict, total=False):
    expirationSeconds: int


class RawSpec(TypedDict, total=False):
    subjects: RawSubjects
    upstreams: list[RawUpstream]
    token: RawToken


class RawMetadata(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    resourceVersion: str
    creationTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]


class RawAgentPolicy(TypedDict, total=False):
    """An AgentPolicy as the CRD's schema says the apiserver serves it.

    ``parse`` takes this type but trusts none of it: a reader may be newer or
    older than the schema, so every field is checked again (as ``object``).
    Objects off the wire become one with ``raw()``.
    """

    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: RawSpec
    status: dict[str, Any]


def raw(obj: Mapping[str, Any]) -> RawAgentPolicy:
    """An object read from the apiserver (JSON), seen as the AgentPolicy it claims to be."""
    return cast(RawAgentPolicy, obj)


# --- Errors -------------------------------------------------------------------


class PolicyError(errors.InvalidInput):
    """An AgentPolicy that cannot be used, with the field to fix.

    ``field`` is a JSON-path-like location (``spec.upstreams[0].url``) so the
    message can be shown as-is in a status condition or an admission warning.
    """

    type = "invalid_policy"


# --- Parsed model -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A path pattern: ``*`` is exactly one segment, ``**`` any number (even none).

    Patterns match the *normalised* request path after the route prefix, which
    the proxy produces; a pattern never sees ``..`` or encoded slashes.
    """

    text: str
    segments: tuple[str, ...]
    _automaton: _Automaton = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_automaton", _Automaton(self.segments))

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        if not text.startswith("/"):
            raise ValueError("must start with '/'")
        segments = tuple(s for s in text.split("/")[1:])
        if segments == ("",):
            segments = ()
        for seg in segments:
            if seg in ("*", "**"):
                continue
            if seg == "":
                raise ValueError("must not contain empty segments ('//') or end with '/'")
            if seg in (".", "..") or not _PATH_SEGMENT.match(seg) or "*" in seg:
                raise ValueError(
                    f"segment {seg!r} is not allowed: use plain segments, '*' or '**'"
                )
        return cls(text, segments)

    def matches(self, path_segments: Sequence[str]) -> bool:
        return self._automaton.matches(path_segments)


class _Automaton:
    """A path pattern read as an automaton, so a match is linear in the path whatever the pattern.

    A backtracking match tries every way of splitting the path between the
    ``**`` of a pattern like ``/**/a/**/b/**/c``: cubic in the path's length,
    seconds for a 1.2 KB target, on the event loop every stream of the pod
    shares. Here the path is walked once while holding the *set* of pattern
    positions it could have reached, as the bits of one integer (bit ``i``:
    the first ``i`` pattern segments match the path so far; bit ``len`` is
    the accepting state). Per path segment: ``*`` and a literal equal to the
    segment move their bit one up, ``**`` keeps its bit (it ate the segment),
    and then every live ``**`` also lights the bit after it (it may eat
    nothing). That is O(pattern x path) bit work, a few integer operations
    per segment for any pattern a policy can hold (bench/globs.py).
    """

    __slots__ = ("_accept", "_any_many", "_any_one", "_literals")

    def __init__(self, segments: tuple[str, ...]) -> None:
        self._any_one = 0  # '*' positions
        self._any_many = 0  # '**' positions
        self._literals: dict[str, int] = {}  # literal -> its positions
        for i, seg in enumerate(segments):
            if seg == "*":
                self._any_one |= 1 << i
            elif seg == "**":
                self._any_many |= 1 << i
            else:
                self._literals[seg] = self._literals.get(seg, 0) | 1 << i
        self._accept = 1 << len(segments)

    def _skip(self, live: int) -> int:
        """Let every live ``**`` match no segment (a run of them needs one pass each)."""
        while True:
            grown = live | (live & self._any_many) << 1
            if grown == live:
                return live
            live = grown

    def matches(self, path: Sequence[str]) -> bool:
        any_one, any_many, literals = self._any_one, self._any_many, self._literals
        live = self._skip(1)
        for seg in path:
            live = (live & (any_one | literals.get(seg, 0))) << 1 | (live & any_many)
            if not live:
                return False
            if live & any_many:
                live = self._skip(live)
        return bool(live & self._accept)


@dataclass(frozen=True, slots=True)
class AllowRule:
    methods: frozenset[str]  # "*" means any method
    paths: tuple[PathPattern, ...]

    def allows(self, method: str, path_segments: Sequence[str]) -> bool:
        if "*" not in self.methods and method not in self.methods:
            return False
        return any(p.matches(path_segments) for p in self.paths)


@dataclass(frozen=True, slots=True)
class Auth:
    """How the upstream credential is attached, and which Secret keys it reads."""

    type: AuthType
    secret_name: str
    key: str | None = None  # bearer, header, query
    header_name: str = "Authorization"  # header
    header_prefix: str = ""  # header
    username_key: str | None = None  # basic
    password_key: str | None = None  # basic
    query_param: str | None = None  # query
    token_url: str | None = None  # oauth2ClientCredentials
    client_id_key: str | None = None
    client_secret_key: str | None = None
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    #: PEM CAs for the token URL alone; None: the system store. Never the upstream's caBundle.
    token_ca_bundle: str | None = None

    @property
    def secret_keys(self) -> tuple[str, ...]:
        """The keys this auth reads from its Secret, in a stable order."""
        keys = (self.key, self.username_key, self.password_key,
                self.client_id_key, self.client_secret_key)
        return tuple(k for k in keys if k is not None)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None  # None: unlimited
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS


@dataclass(frozen=True, slots=True)
class EnvVar:
    """An env var the webhook points at the local route, e.g. OPENAI_BASE_URL."""

    name: str
    suffix: str = ""


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/v1" (no trailing slash)
    auth: Auth
    allow: tuple[AllowRule, ...]
    limits: Limits = field(default_factory=Limits)
    insecure: bool = False
    ca_bundle: str | None = None
    env: tuple[EnvVar, ...] = ()
    llm: llmpolicy.Llm | None = None  # None: paths only (no ``api``)

    @property
    def host_is_ip_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def allows(self, method: str, path_segments: Sequence[str]) -> bool:
        return any(rule.allows(method, path_segments) for rule in self.allow)


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    creation_timestamp: str  # RFC 3339; sorts chronologically as text
    service_accounts: frozenset[str]
    upstreams: tuple[Upstream, ...]
    token_expiration_seconds: int = contract.DEFAULT_TOKEN_EXPIRATION_SECONDS

    def selects(self, service_account: str) -> bool:
        return service_account in self.service_accounts

    @property
    def secret_names(self) -> frozenset[str]:
        return frozenset(u.auth.secret_name for u in self.upstreams)

    @property
    def age_key(self) -> tuple[str, str]:
        """Orders policies oldest first; the name breaks ties deterministically."""
        return (self.creation_timestamp, self.name)


# --- Parsing ------------------------------------------------------------------
#
# Each reader parses the object as served, which it does not trust (the CRD's
# schema may be older than the reader): every value is looked at as ``object``
# and checked before it is used, and every check names the field to fix.


def _text(value: object, where: str) -> str:
    """A required, non-empty string."""
    if value is None:
        raise PolicyError(where, "is required")
    if not isinstance(value, str):
        raise PolicyError(where, f"must be a string, got {type(value).__name__}")
    if not value:
        raise PolicyError(where, "must not be empty")
    return value


def _optional_text(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise PolicyError(where, f"must be a string, got {type(value).__name__}")
    return value


def _number(value: object, where: str, *, minimum: int, maximum: int) -> int | None:
    """An integer within bounds, or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(where, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise PolicyError(where, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _object(value: object, where: str, needs: str) -> Mapping[str, object]:
    """A JSON object; ``needs`` finishes the message when it is missing ("is required ...")."""
    if not isinstance(value, Mapping):
        raise PolicyError(where, needs)
    return value


def _secret_key(value: object, where: str) -> str:
    key = _text(value, where)
    if not _SECRET_KEY.match(key):
        raise PolicyError(where, f"{key!r} is not a valid Secret key")
    return key


def _pem(value: object, where: str) -> str | None:
    pem = _optional_text(value, where)
    if pem is not None and "-----BEGIN CERTIFICATE-----" not in pem:
        raise PolicyError(where, "must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    return pem


# --- auth, one parser per type --------------------------------------------------


def _secret_name(raw: Mapping[str, object], where: str) -> tuple[Mapping[str, object], str]:
    ref = _object(raw.get("secretRef"), f"{where}.secretRef",
                  "is required: name the Secret that holds the credential")
    name = _text(ref.get("name"), f"{where}.secretRef.name")
    if not _DNS_SUBDOMAIN.match(name):
        raise PolicyError(f"{where}.secretRef.name", f"{name!r} is not a valid Secret name")
    return ref, name


def _header_auth(raw: Mapping[str, object], where: str, secret: str, key: str) -> Auth:
    hdr = _object(raw.get("header"), f"{where}.header", "is required for type header (name and optional prefix)")
    name = _text(hdr.get("name"), f"{where}.header.name")
    if not _HEADER_NAME.match(name):
        raise PolicyError(f"{where}.header.name", f"{name!r} is not a valid header name")
    prefix = _optional_text(hdr.get("prefix", ""), f"{where}.header.prefix") or ""
    return Auth(type="header", secret_name=secret, key=key, header_name=name, header_prefix=prefix)


def _query_auth(raw: Mapping[str, object], where: str, secret: str, key: str) -> Auth:
    q = _object(raw.get("query"), f"{where}.query", "is required for type query (param)")
    return Auth(type="query", secret_name=secret, key=key, query_param=_text(q.get("param"), f"{where}.query.param"))


def _basic_auth(raw: Mapping[str, object], where: str, secret: str) -> Auth:
    b = _object(raw.get("basic"), f"{where}.basic", "is required for type basic (usernameKey, passwordKey)")
    return Auth(type="basic", secret_name=secret,
                username_key=_secret_key(b.get("usernameKey"), f"{where}.basic.usernameKey"),
                password_key=_secret_key(b.get("passwordKey"), f"{where}.basic.passwordKey"))


def _oauth2_auth(raw: Mapping[str, object], where: str, secret: str) -> Auth:
    ow = f"{where}.oauth2ClientCredentials"
    o = _object(raw.get("oauth2ClientCredentials"), ow,
                "is required for type oauth2ClientCredentials (tokenURL, clientIdKey, clientSecretKey)")
    token_url = _text(o.get("tokenURL"), f"{ow}.tokenURL")
    parts = urlsplit(token_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise PolicyError(f"{ow}.tokenURL", "must be an absolute https URL")
    scopes = o.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise PolicyError(f"{ow}.scopes", "must be a list of non-empty strings")
    return Auth(type="oauth2ClientCredentials", secret_name=secret,
                token_url=token_url,
                client_id_key=_secret_key(o.get("clientIdKey"), f"{ow}.clientIdKey"),
                client_secret_key=_secret_key(o.get("clientSecretKey"), f"{ow}.clientSecretKey"),
                scopes=tuple(scopes), audience=_optional_text(o.get("audience"), f"{ow}.audience"),
                token_ca_bundle=_pem(o.get("caBundle"), f"{ow}.caBundle"))


def parse_auth(raw: Mapping[str, Any], where: str) -> Auth:
    kind = raw.get("type")
    if kind not in AUTH_TYPES:
        raise PolicyError(f"{where}.type", f"must be one of {', '.join(AUTH_TYPES)}, got {kind!r}")
    ref, secret = _secret_name(raw, where)
    if kind == "basic":
        return _basic_auth(raw, where, secret)
    if kind == "oauth2ClientCredentials":
        return _oauth2_auth(raw, where, secret)
    key = _secret_key(ref.get("key"), f"{where}.secretRef.key")
    if kind == "header":
        return _header_auth(raw, where, secret, key)
    if kind == "query":
        return _query_auth(raw, where, secret, key)
    return Auth(type="bearer", secret_name=secret, key=key)


# --- an upstream, one parser per field group -----------------------------------------


@dataclass(frozen=True, slots=True)
class _Url:
    text: str
    scheme: str
    host: str
    port: int
    base_path: str


def _upstream_name(value: object, where: str) -> str:
    name = _text(value, where)
    if not _DNS_LABEL.match(name):
        raise PolicyError(where, f"{name!r} must be a DNS label (lowercase letters, digits, '-')")
    return name


def _upstream_url(value: object, where: str, insecure: bool) -> _Url:
    url = _text(value, where)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PolicyError(where, f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise PolicyError(where, "must be an https:// URL")
    if parts.scheme == "http" and not insecure:
        raise PolicyError(where, "must use https; set insecure: true only for a trusted local upstream")
    if not parts.hostname:
        raise PolicyError(where, "must name a host")
    if parts.username or parts.password or "@" in parts.netloc:
        raise PolicyError(where, "must not carry user info; put credentials in the Secret")
    if parts.query or parts.fragment:
        raise PolicyError(where, "must not carry a query or fragment")
    base_path = parts.path.rstrip("/")
    if base_path:
        try:
            PathPattern.compile(base_path)
        except ValueError as exc:
            raise PolicyError(where, f"base path {exc}") from None
        if "*" in base_path:
            raise PolicyError(where, "base path must not contain '*'")
    return _Url(url, parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80),
                base_path)


def _upstream_auth(value: object, where: str, insecure: bool) -> Auth:
    auth = parse_auth(_object(value, where, "is required"), where)
    if auth.token_url is not None and urlsplit(auth.token_url).scheme == "http" and not insecure:
        raise PolicyError(f"{where}.oauth2ClientCredentials.tokenURL",
                          "must use https; http only with insecure: true on the upstream")
    return auth


def _allow_rule(rule: object, where: str) -> AllowRule:
    rule = _object(rule, where, "must be an object with methods and paths")
    methods = rule.get("methods") or ["*"]
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise PolicyError(f"{where}.methods", "must be a list of HTTP methods")
    upper = {m.upper() for m in methods}
    bad = sorted(upper - METHODS - {"*"})
    if bad:
        raise PolicyError(f"{where}.methods", f"unknown method {bad[0]!r}; use {', '.join(sorted(METHODS))} or '*'")
    paths = rule.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise PolicyError(f"{where}.paths", "needs at least one path pattern such as '/chat/completions' or '/**'")
    compiled = []
    for j, p in enumerate(paths):
        try:
            compiled.append(PathPattern.compile(p))
        except ValueError as exc:
            raise PolicyError(f"{where}.paths[{j}]", f"{p!r} {exc}") from None
    return AllowRule(frozenset(upper), tuple(compiled))


def _allow_rules(value: object, where: str) -> tuple[AllowRule, ...]:
    if not isinstance(value, list) or not value:
        raise PolicyError(where, "needs at least one rule (methods and paths); use paths: ['/**'] to allow all")
    return tuple(_allow_rule(rule, f"{where}[{i}]") for i, rule in enumerate(value))


def _limits(value: object, where: str) -> Limits:
    lim = _object(value or {}, where, "must be an object")
    max_bytes = _number(lim.get("maxRequestBytes"), f"{where}.maxRequestBytes", minimum=1, maximum=1 << 30)
    timeout = _number(lim.get("timeoutSeconds"), f"{where}.timeoutSeconds", minimum=1, maximum=3600)
    return Limits(
        requests_per_minute=_number(lim.get("requestsPerMinute"), f"{where}.requestsPerMinute",
                                    minimum=1, maximum=1_000_000),
        max_request_bytes=max_bytes or DEFAULT_MAX_REQUEST_BYTES,
        timeout_seconds=timeout or DEFAULT_TIMEOUT_SECONDS,
    )


def _env_var(value: object, where: str) -> EnvVar:
    e = _object(value, where, "must be an object with name and optional suffix")
    name = _text(e.get("name"), f"{where}.name")
    if not _ENV_NAME.match(name):
        raise PolicyError(f"{where}.name", f"{name!r} is not a valid environment variable name")
    suffix = _optional_text(e.get("suffix", ""), f"{where}.suffix") or ""
    if suffix and not suffix.startswith("/"):
        raise PolicyError(f"{where}.suffix", "must start with '/'")
    return EnvVar(name, suffix.rstrip("/"))


def _env_vars(value: object, where: str) -> tuple[EnvVar, ...]:
    items = value or []
    if not isinstance(items, list):
        raise PolicyError(where, "must be a list of {name, suffix}")
    return tuple(_env_var(e, f"{where}[{i}]") for i, e in enumerate(items))


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(where, "must be a boolean")
    return value


def parse_upstream(raw: Mapping[str, Any], where: str) -> Upstream:
    """One ``spec.upstreams[i]``; the first problem raises a PolicyError naming its field."""
    name = _upstream_name(raw.get("name"), f"{where}.name")
    url_text = _text(raw.get("url"), f"{where}.url")
    insecure = _flag(raw.get("insecure", False), f"{where}.insecure")
    url = _upstream_url(url_text, f"{where}.url", insecure)
    auth = _upstream_auth(raw.get("auth"), f"{where}.auth", insecure)
    allow = _allow_rules(raw.get("allow"), f"{where}.allow")
    limits = _limits(raw.get("limits"), f"{where}.limits")
    ca = _pem(raw.get("caBundle"), f"{where}.caBundle")
    env = _env_vars(raw.get("env"), f"{where}.env")
    try:
        llm = llmpolicy.parse(raw, where)
    except llmpolicy.FieldError as exc:
        raise PolicyError(exc.field, exc.message) from None
    return Upstream(
        name=name, url=url.text, scheme=url.scheme, host=url.host, port=url.port, base_path=url.base_path,
        auth=auth, allow=allow, limits=limits, insecure=insecure, ca_bundle=ca, env=env, llm=llm,
    )


def parse(obj: RawAgentPolicy) -> AgentPolicy:
    """Parse an AgentPolicy as served by the apiserver; raise PolicyError on the first problem."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PolicyError("spec", "is required")
    subjects = spec.get("subjects") or {}
    sas = subjects.get("serviceAccounts") if isinstance(subjects, Mapping) else None
    if not isinstance(sas, list) or not sas:
        raise PolicyError("spec.subjects.serviceAccounts", "needs at least one service account name")
    for i, sa in enumerate(sas):
        if not isinstance(sa, str) or not _DNS_SUBDOMAIN.match(sa):
            raise PolicyError(f"spec.subjects.serviceAccounts[{i}]", f"{sa!r} is not a valid service account name")
    ups_raw = spec.get("upstreams")
    if not isinstance(ups_raw, list) or not ups_raw:
        raise PolicyError("spec.upstreams", "needs at least one upstream")
    upstreams: list[Upstream] = []
    seen: dict[str, int] = {}
    env_seen: dict[str, int] = {}
    for i, raw in enumerate(ups_raw):
        where = f"spec.upstreams[{i}]"
        if not isinstance(raw, Mapping):
            raise PolicyError(where, "must be an object")
        up = parse_upstream(raw, where)
        if up.name in seen:
            raise PolicyError(f"{where}.name", f"{up.name!r} is already used by spec.upstreams[{seen[up.name]}]")
        seen[up.name] = i
        for e in up.env:
            if e.name in env_seen:
                raise PolicyError(f"{where}.env", f"{e.name} is already set by spec.upstreams[{env_seen[e.name]}]")
            env_seen[e.name] = i
        upstreams.append(up)
    token = spec.get("token") or {}
    if not isinstance(token, Mapping):
        raise PolicyError("spec.token", "must be an object")
    exp = _number(token.get("expirationSeconds"), "spec.token.expirationSeconds",
                  minimum=contract.MIN_TOKEN_EXPIRATION_SECONDS, maximum=86400)
    return AgentPolicy(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), generation=int(meta.get("generation", 0) or 0),
        resource_version=str(meta.get("resourceVersion", "")),
        creation_timestamp=str(meta.get("creationTimestamp", "")),
        service_accounts=frozenset(sas), upstreams=tuple(upstreams),
        token_expiration_seconds=contract.DEFAULT_TOKEN_EXPIRATION_SECONDS if exp is None else exp,
    )


# --- Selecting and merging ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conflict:
    """A newer policy lost an upstream name or env var to an older one."""

    loser: AgentPolicy
    winner: AgentPolicy
    service_account: str
    what: Literal["upstream", "env"]
    name: str

    @property
    def message(self) -> str:
        return (f"{self.what} {self.name!r} for service account {self.service_account!r} is already "
                f"given by the older AgentPolicy {self.winner.name!r}; rename it or remove it here")


@dataclass(frozen=True, slots=True)
class Selection:
    """What one service account gets from the policies of its namespace."""

    policies: tuple[AgentPolicy, ...]  # the policies that select it, oldest first
    upstreams: Mapping[str, tuple[AgentPolicy, Upstream]]  # winners by route name
    conflicts: tuple[Conflict, ...]

    @property
    def token_expiration_seconds(self) -> int:
        """The shortest lifetime any selecting policy asks for."""
        if not self.policies:
            return contract.DEFAULT_TOKEN_EXPIRATION_SECONDS
        return min(p.token_expiration_seconds for p in self.policies)

    @property
    def env(self) -> tuple[tuple[EnvVar, Upstream], ...]:
        return tuple((e, up) for _, up in self.upstreams.values() for e in up.env)


def select(policies: Iterable[AgentPolicy], service_account: str) -> Selection:
    """Merge the policies that name ``service_account``; the older policy wins conflicts."""
    chosen = sorted((p for p in policies if p.selects(service_account)), key=lambda p: p.age_key)
    upstreams: dict[str, tuple[AgentPolicy, Upstream]] = {}
    env_owner: dict[str, AgentPolicy] = {}
    conflicts: list[Conflict] = []
    for policy in chosen:
        for up in policy.upstreams:
            if up.name in upstreams and upstreams[up.name][0] is not policy:
                conflicts.append(Conflict(policy, upstreams[up.name][0], service_account, "upstream", up.name))
                continue
            clash = next((e.name for e in up.env if e.name in env_owner and env_owner[e.name] is not policy), None)
            if clash is not None:
                conflicts.append(Conflict(policy, env_owner[clash], service_account, "env", clash))
                continue
            upstreams[up.name] = (policy, up)
            for e in up.env:
                env_owner[e.name] = policy
    return Selection(tuple(chosen), upstreams, tuple(conflicts))
