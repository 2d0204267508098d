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
from typing import Any, Final, Literal, TypedDict, get_args
from urllib.parse import urlsplit

from sidekey.core import contract, llmpolicy

AuthType = Literal["bearer", "header", "basic", "query", "oauth2ClientCredentials"]
AUTH_TYPES: Final[tuple[str, ...]] = get_args(AuthType)
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

DEFAULT_MAX_REQUEST_BYTES: Final = 10 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS: Final = 600

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@-]+$")


# --- Raw shapes, as the apiserver serves them ---------------------------------


class RawSecretRef(TypedDict, total=False):
    name: str
    key: str


class RawAuth(TypedDict, total=False):
    type: str
    secretRef: RawSecretRef
    header: dict[str, str]
    basic: dict[str, str]
    query: dict[str, str]
    oauth2ClientCredentials: dict[str, Any]


class RawUpstream(TypedDict, total=False):
    name: str
    url: str
    insecure: bool
    auth: RawAuth
    allow: list[dict[str, list[str]]]
    limits: dict[str, int]
    caBundle: str
    env: list[dict[str, str]]
    api: str  # LLM fields: see core/llmpolicy.py
    models: list[str]
    budgets: list[dict[str, Any]]
    capMaxTokens: bool


class RawSpec(TypedDict, total=False):
    subjects: dict[str, list[str]]
    upstreams: list[RawUpstream]
    token: dict[str, int]


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
    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: RawSpec
    status: dict[str, Any]


# --- Errors -------------------------------------------------------------------


class PolicyError(ValueError):
    """An AgentPolicy that cannot be used, with the field to fix.

    ``field`` is a JSON-path-like location (``spec.upstreams[0].url``) so the
    message can be shown as-is in a status condition or an admission warning.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def _str(value: object, where: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise PolicyError(where, "is required")
        return None
    if not isinstance(value, str):
        raise PolicyError(where, f"must be a string, got {type(value).__name__}")
    if required and not value:
        raise PolicyError(where, "must not be empty")
    return value


def _int(value: object, where: str, default: int | None, *, minimum: int, maximum: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(where, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise PolicyError(where, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _secret_key(value: object, where: str) -> str:
    key = _str(value, where)
    assert key is not None
    if not _SECRET_KEY.match(key):
        raise PolicyError(where, f"{key!r} is not a valid Secret key")
    return key


def parse_auth(raw: Mapping[str, Any], where: str) -> Auth:
    kind = raw.get("type")
    if kind not in AUTH_TYPES:
        raise PolicyError(f"{where}.type", f"must be one of {', '.join(AUTH_TYPES)}, got {kind!r}")
    ref = raw.get("secretRef")
    if not isinstance(ref, Mapping):
        raise PolicyError(f"{where}.secretRef", "is required: name the Secret that holds the credential")
    secret_name = _str(ref.get("name"), f"{where}.secretRef.name")
    assert secret_name is not None
    if not _DNS_SUBDOMAIN.match(secret_name):
        raise PolicyError(f"{where}.secretRef.name", f"{secret_name!r} is not a valid Secret name")
    key_where = f"{where}.secretRef.key"
    if kind in ("bearer", "header", "query"):
        key = _secret_key(ref.get("key"), key_where)
        if kind == "bearer":
            return Auth(type="bearer", secret_name=secret_name, key=key)
        if kind == "header":
            hdr = raw.get("header")
            if not isinstance(hdr, Mapping):
                raise PolicyError(f"{where}.header", "is required for type header (name and optional prefix)")
            name = _str(hdr.get("name"), f"{where}.header.name")
            assert name is not None
            if not _HEADER_NAME.match(name):
                raise PolicyError(f"{where}.header.name", f"{name!r} is not a valid header name")
            prefix = _str(hdr.get("prefix", ""), f"{where}.header.prefix", required=False) or ""
            return Auth(type="header", secret_name=secret_name, key=key,
                        header_name=name, header_prefix=prefix)
        q = raw.get("query")
        if not isinstance(q, Mapping):
            raise PolicyError(f"{where}.query", "is required for type query (param)")
        param = _str(q.get("param"), f"{where}.query.param")
        assert param is not None
        return Auth(type="query", secret_name=secret_name, key=key, query_param=param)
    if kind == "basic":
        b = raw.get("basic")
        if not isinstance(b, Mapping):
            raise PolicyError(f"{where}.basic", "is required for type basic (usernameKey, passwordKey)")
        return Auth(type="basic", secret_name=secret_name,
                    username_key=_secret_key(b.get("usernameKey"), f"{where}.basic.usernameKey"),
                    password_key=_secret_key(b.get("passwordKey"), f"{where}.basic.passwordKey"))
    o = raw.get("oauth2ClientCredentials")
    if not isinstance(o, Mapping):
        raise PolicyError(f"{where}.oauth2ClientCredentials",
                          "is required for type oauth2ClientCredentials (tokenURL, clientIdKey, clientSecretKey)")
    ow = f"{where}.oauth2ClientCredentials"
    token_url = _str(o.get("tokenURL"), f"{ow}.tokenURL")
    assert token_url is not None
    parts = urlsplit(token_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise PolicyError(f"{ow}.tokenURL", "must be an absolute https URL")
    scopes = o.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise PolicyError(f"{ow}.scopes", "must be a list of non-empty strings")
    token_ca = _str(o.get("caBundle"), f"{ow}.caBundle", required=False)
    if token_ca is not None and "-----BEGIN CERTIFICATE-----" not in token_ca:
        raise PolicyError(f"{ow}.caBundle", "must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    return Auth(type="oauth2ClientCredentials", secret_name=secret_name,
                token_url=token_url,
                client_id_key=_secret_key(o.get("clientIdKey"), f"{ow}.clientIdKey"),
                client_secret_key=_secret_key(o.get("clientSecretKey"), f"{ow}.clientSecretKey"),
                scopes=tuple(scopes), audience=_str(o.get("audience"), f"{ow}.audience", required=False),
                token_ca_bundle=token_ca)


def parse_upstream(raw: Mapping[str, Any], where: str) -> Upstream:
    name = _str(raw.get("name"), f"{where}.name")
    assert name is not None
    if not _DNS_LABEL.match(name):
        raise PolicyError(f"{where}.name", f"{name!r} must be a DNS label (lowercase letters, digits, '-')")
    url = _str(raw.get("url"), f"{where}.url")
    assert url is not None
    insecure = raw.get("insecure", False)
    if not isinstance(insecure, bool):
        raise PolicyError(f"{where}.insecure", "must be a boolean")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PolicyError(f"{where}.url", f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise PolicyError(f"{where}.url", "must be an https:// URL")
    if parts.scheme == "http" and not insecure:
        raise PolicyError(f"{where}.url", "must use https; set insecure: true only for a trusted local upstream")
    if not parts.hostname:
        raise PolicyError(f"{where}.url", "must name a host")
    if parts.username or parts.password or "@" in parts.netloc:
        raise PolicyError(f"{where}.url", "must not carry user info; put credentials in the Secret")
    if parts.query or parts.fragment:
        raise PolicyError(f"{where}.url", "must not carry a query or fragment")
    base_path = parts.path.rstrip("/")
    if base_path:
        try:
            PathPattern.compile(base_path)
        except ValueError as exc:
            raise PolicyError(f"{where}.url", f"base path {exc}") from None
        if "*" in base_path:
            raise PolicyError(f"{where}.url", "base path must not contain '*'")
    auth_raw = raw.get("auth")
    if not isinstance(auth_raw, Mapping):
        raise PolicyError(f"{where}.auth", "is required")
    auth = parse_auth(auth_raw, f"{where}.auth")
    if auth.token_url is not None and urlsplit(auth.token_url).scheme == "http" and not insecure:
        raise PolicyError(f"{where}.auth.oauth2ClientCredentials.tokenURL",
                          "must use https; http only with insecure: true on the upstream")
    allow_raw = raw.get("allow")
    if not isinstance(allow_raw, list) or not allow_raw:
        raise PolicyError(f"{where}.allow", "needs at least one rule (methods and paths); use paths: ['/**'] to allow all")
    rules: list[AllowRule] = []
    for i, rule in enumerate(allow_raw):
        rw = f"{where}.allow[{i}]"
        if not isinstance(rule, Mapping):
            raise PolicyError(rw, "must be an object with methods and paths")
        methods = rule.get("methods") or ["*"]
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise PolicyError(f"{rw}.methods", "must be a list of HTTP methods")
        upper = {m.upper() for m in methods}
        bad = sorted(upper - METHODS - {"*"})
        if bad:
            raise PolicyError(f"{rw}.methods", f"unknown method {bad[0]!r}; use {', '.join(sorted(METHODS))} or '*'")
        paths = rule.get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise PolicyError(f"{rw}.paths", "needs at least one path pattern such as '/chat/completions' or '/**'")
        compiled = []
        for j, p in enumerate(paths):
            try:
                compiled.append(PathPattern.compile(p))
            except ValueError as exc:
                raise PolicyError(f"{rw}.paths[{j}]", f"{p!r} {exc}") from None
        rules.append(AllowRule(frozenset(upper), tuple(compiled)))
    lim = raw.get("limits") or {}
    if not isinstance(lim, Mapping):
        raise PolicyError(f"{where}.limits", "must be an object")
    limits = Limits(
        requests_per_minute=_int(lim.get("requestsPerMinute"), f"{where}.limits.requestsPerMinute",
                                 None, minimum=1, maximum=1_000_000),
        max_request_bytes=_int(lim.get("maxRequestBytes"), f"{where}.limits.maxRequestBytes",
                               DEFAULT_MAX_REQUEST_BYTES, minimum=1, maximum=1 << 30) or DEFAULT_MAX_REQUEST_BYTES,
        timeout_seconds=_int(lim.get("timeoutSeconds"), f"{where}.limits.timeoutSeconds",
                             DEFAULT_TIMEOUT_SECONDS, minimum=1, maximum=3600) or DEFAULT_TIMEOUT_SECONDS,
    )
    ca = _str(raw.get("caBundle"), f"{where}.caBundle", required=False)
    if ca is not None and "-----BEGIN CERTIFICATE-----" not in ca:
        raise PolicyError(f"{where}.caBundle", "must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    env_raw = raw.get("env") or []
    if not isinstance(env_raw, list):
        raise PolicyError(f"{where}.env", "must be a list of {name, suffix}")
    env: list[EnvVar] = []
    for i, e in enumerate(env_raw):
        ew = f"{where}.env[{i}]"
        if not isinstance(e, Mapping):
            raise PolicyError(ew, "must be an object with name and optional suffix")
        ename = _str(e.get("name"), f"{ew}.name")
        assert ename is not None
        if not _ENV_NAME.match(ename):
            raise PolicyError(f"{ew}.name", f"{ename!r} is not a valid environment variable name")
        suffix = _str(e.get("suffix", ""), f"{ew}.suffix", required=False) or ""
        if suffix and not suffix.startswith("/"):
            raise PolicyError(f"{ew}.suffix", "must start with '/'")
        env.append(EnvVar(ename, suffix.rstrip("/")))
    try:
        llm = llmpolicy.parse(raw, where)
    except llmpolicy.FieldError as exc:
        raise PolicyError(exc.field, exc.message) from None
    return Upstream(
        llm=llm,
        name=name, url=url, scheme=parts.scheme, host=parts.hostname.lower(),
        port=port or (443 if parts.scheme == "https" else 80), base_path=base_path,
        auth=auth, allow=tuple(rules), limits=limits, insecure=insecure, ca_bundle=ca, env=tuple(env),
    )


def parse(obj: Mapping[str, Any]) -> AgentPolicy:
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
    exp = _int(token.get("expirationSeconds"), "spec.token.expirationSeconds",
               contract.DEFAULT_TOKEN_EXPIRATION_SECONDS,
               minimum=contract.MIN_TOKEN_EXPIRATION_SECONDS, maximum=86400)
    assert exp is not None
    return AgentPolicy(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), generation=int(meta.get("generation", 0) or 0),
        resource_version=str(meta.get("resourceVersion", "")),
        creation_timestamp=str(meta.get("creationTimestamp", "")),
        service_accounts=frozenset(sas), upstreams=tuple(upstreams), token_expiration_seconds=exp,
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
