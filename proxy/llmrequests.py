"""Reading an LLM request: which model, how many tokens it may cost, and the body to forward.

Only upstreams with ``api`` set get here, and only for the endpoints that
name a model and spend tokens:

    openai     POST .../chat/completions  .../completions  .../responses  .../embeddings
    anthropic  POST .../messages          .../messages/count_tokens (model checked, no budget)

plus ``GET .../models/<id>``, which names a model too. Other paths are
decided by the allow rules alone (keep batch and file endpoints, which carry
requests the sidecar does not read, out of a budgeted policy's ``allow``).

The body is parsed strictly, so that no upstream parser can read it another
way: no member named twice at any depth (parsers disagree on which one
wins), no two top-level members differing only in case (Go's decoder, for
one, matches field names case-insensitively), no NaN, bounded depth. A body
that passes goes up byte for byte; a change the sidecar makes (the cap, the
usage request) is a member inserted at the front of the top-level object,
which the checks above prove absent, or, for a nested change, the whole
body re-serialised from what was parsed.

The estimate is deliberately an upper bound for text: a prompt of ``n``
bytes is at most ``n`` tokens for byte-level BPE tokenizers (every token
covers at least one byte, and the JSON around the text outweighs the chat
template's few tokens per message), plus the most the reply may hold
(``max_tokens`` and its siblings, times ``n`` choices). Images given by URL
are the known exception; the settle charges what the upstream reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sidekey.core import errors, llmpolicy

Endpoint = Literal["chat", "completions", "responses", "embeddings", "messages", "count_tokens"]

#: The largest body read to find the model (the upstream's maxRequestBytes applies too).
MAX_BODY: Final = 32 * 1024 * 1024
MAX_MODEL_LENGTH: Final = 256
#: The reply's limit field the sidecar sets when it caps a request, per endpoint.
CAP_FIELD: Final[dict[str, str]] = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
    "messages": "max_tokens",
}
#: Fields that bound the reply, read in this order (the first present wins).
_LIMIT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),
    "embeddings": (),
    "count_tokens": (),
}
#: Endpoints whose requests may ask for several choices.
_CHOICES: Final = frozenset({"chat", "completions"})


class LlmRefusal(errors.Denied):
    """A request refused for its body (400), its model (403) or its budget (429); ``kind`` is the body's type."""

    def __init__(self, status: int, reason: str, kind: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason, message)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


def _bad(message: str) -> LlmRefusal:
    return LlmRefusal(400, "bad_llm_body", "invalid_request_error", message)


#: Methods that carry a body an upstream could take as an LLM request.
BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def _bare(segment: str) -> str:
    """A segment as a lenient router would route it: matrix parameters cut, case folded."""
    return segment.split(";", 1)[0].lower()


def endpoint(api: llmpolicy.Api, segments: Sequence[str]) -> Endpoint | None:
    """The LLM endpoint a path names, by its last segments (any base path before them).

    Matched leniently (``/CHAT/Completions``, ``/completions;v=1``): some routers
    fold case or drop matrix parameters, and a call they would route to a model
    must not pass here as some other path.
    """
    if not segments:
        return None
    last = _bare(segments[-1])
    before = _bare(segments[-2]) if len(segments) > 1 else ""
    if api == "openai":
        if last == "completions":
            return "chat" if before == "chat" else "completions"
        if last in ("responses", "embeddings"):
            return "responses" if last == "responses" else "embeddings"
        return None
    if last == "messages":
        return "messages"
    if last == "count_tokens" and before == "messages":
        return "count_tokens"
    return None


def model_in_path(segments: Sequence[str]) -> str | None:
    """``GET .../models/<id>`` names a model (OpenAI and Anthropic alike)."""
    if len(segments) >= 2 and _bare(segments[-2]) == "models":
        return segments[-1].split(";", 1)[0]
    return None


def lists_models(segments: Sequence[str]) -> bool:
    return bool(segments) and _bare(segments[-1]) == "models"


@dataclass(slots=True)
class Call:
    """A parsed LLM request: what was checked, what it may cost, and how it was changed."""

    endpoint: Endpoint
    model: str
    stream: bool
    body: dict[str, Any]
    prompt_estimate: int  # tokens, an upper bound for text
    max_output: int | None  # the reply's bound in tokens (all choices), None: unbounded
    choices: int = 1
    #: The sidecar asked an OpenAI stream for usage; its usage-only chunk is removed.
    added_usage: bool = False
    capped: bool = False
    raw: bytes = b""  # the body as received
    #: Top-level members the sidecar adds (absent from ``raw``), inserted at the front.
    inserts: dict[str, Any] = field(default_factory=dict)
    #: A nested change: the body is re-serialised from ``body``.
    rewritten: bool = False

    @property
    def spends(self) -> bool:
        return self.endpoint != "count_tokens"

    @property
    def estimate(self) -> int:
        """The reservation: prompt plus the reply's bound (the prompt alone when unbounded)."""
        return self.prompt_estimate + (self.max_output or 0)

    def cap(self, left: int) -> bool:
        """Set the reply's limit to what ``left`` allows after the prompt; False if nothing is left."""
        per_choice = (left - self.prompt_estimate) // self.choices
        if per_choice < 1:
            return False
        name = CAP_FIELD[self.endpoint]
        if name in self.body:  # present as null: an inserted twin would be read two ways
            self.rewritten = True
        else:
            self.inserts[name] = per_choice
        self.body[name] = per_choice
        self.max_output = per_choice * self.choices
        self.capped = True
        return True

    def encoded(self) -> bytes:
        """The body to forward: as received, with the sidecar's members in front (or re-serialised)."""
        if self.rewritten or not self.raw:
            return json.dumps(self.body, separators=(",", ":")).encode()
        if not self.inserts:
            return self.raw
        start = self.raw.index(b"{") + 1  # the parse proved one object with members
        added = b"".join(b'"%s":%s,' % (k.encode(), str(v).encode() if isinstance(v, int) else
                                                   json.dumps(v, separators=(",", ":")).encode())
                         for k, v in self.inserts.items())
        return self.raw[:start] + added + self.raw[start:]


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _bad(f"the JSON body repeats the member {k[:64]!r}; send each member once")
            seen.add(k)
    return obj


def _no_constant(name: str) -> Any:
    raise _bad(f"the JSON body holds {name}, which is not JSON")


_STRICT: Final = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant)


def parse_json(body: bytes) -> dict[str, Any]:
    """A strict parse of a request body; 400 on anything but one plain JSON object."""
    if len(body) > MAX_BODY:
        raise _bad(f"the body is {len(body)} bytes; the sidecar reads LLM requests of at most {MAX_BODY}")
    if not body.strip():
        raise _bad("the body is empty; send a JSON object with a model")
    try:
        doc = _STRICT.decode(body.decode())
    except LlmRefusal:
        raise
    except RecursionError:
        raise _bad("the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"the body is not JSON ({type(exc).__name__}); send a JSON object with a model") from None
    if not isinstance(doc, dict):
        raise _bad("the body must be a JSON object with a model")
    if len({k.lower() for k in doc}) != len(doc):
        raise _bad("the JSON body has two members whose names differ only in case; some parsers read "
                    "them as one: send each member once")
    return doc


def _limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{name} must be a non-negative integer")
    return value


def read(api: llmpolicy.Api, where: Endpoint, raw: bytes) -> Call:
    """Parse the body of a POST to an LLM endpoint; LlmRefusal 400 when it cannot be read."""
    body = parse_json(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"the body names no model; {api} requests to this endpoint need \"model\"")
    if len(model) > MAX_MODEL_LENGTH:
        raise _bad(f"the model name is longer than {MAX_MODEL_LENGTH} characters")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false")
    choices = 1
    if where in _CHOICES:
        n = body.get("n", 1)
        best = body.get("best_of", 1) if where == "completions" else 1
        for name, value in (("n", n), ("best_of", best)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128):
                raise _bad(f"{name} must be an integer between 1 and 128")
        choices = max(n or 1, best or 1)
    max_output: int | None = None
    for name in _LIMIT_FIELDS[where]:
        found = _limit(body, name)
        if found is not None:
            max_output = found * choices
            break
    if where == "embeddings":
        max_output = 0
    call = Call(endpoint=where, model=model, stream=stream, body=body, prompt_estimate=len(raw),
                max_output=max_output, choices=choices, raw=raw)
    if stream and api == "openai" and where in ("chat", "completions"):
        raw_keys = set(body)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("stream_options must be an object")
        if not (options or {}).get("include_usage"):
            body["stream_options"] = {**(options or {}), "include_usage": True}
            call.added_usage = True
            if "stream_options" not in raw_keys:
                call.inserts["stream_options"] = {"include_usage": True}
            else:
                call.rewritten = True
    return call


def check_model(llm: llmpolicy.Llm, model: str, policy: str, upstream: str) -> None:
    """403 naming the model and the policy when the allow-list does not hold it."""
    if llm.allows_model(model):
        return
    allowed = ", ".join(p.text for p in llm.models[:8]) + (", ..." if len(llm.models) > 8 else "")
    raise LlmRefusal(
        403, "model_not_allowed", "permission_error",
        f"AgentPolicy {policy!r} does not allow model {model[:MAX_MODEL_LENGTH]!r} on upstream "
        f"{upstream!r}; allowed: {allowed} (spec.upstreams[].models)")


def filter_models(llm: llmpolicy.Llm, raw: bytes) -> bytes | None:
    """A ``GET /models`` answer with only the allowed models; None when it is not a model list."""
    if not llm.models:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    kept = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and llm.allows_model(m["id"])]
    doc["data"] = kept
    if "first_id" in doc:  # Anthropic's page markers
        doc["first_id"] = kept[0]["id"] if kept else None
        doc["last_id"] = kept[-1]["id"] if kept else None
    return json.dumps(doc, separators=(",", ":")).encode()
