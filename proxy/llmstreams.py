"""Reading what an LLM reply cost: ``usage`` from JSON bodies and from SSE streams.

The settle needs the upstream's own count, which arrives in different places:

    openai     JSON: usage{prompt_tokens, completion_tokens, prompt_tokens_details.cached_tokens}
               chat/completions stream: the final chunk (choices: [], usage: {...}), present
                 only with stream_options.include_usage, which the sidecar adds if the agent
                 did not ask (and then removes that chunk, which the agent never asked for)
               responses stream: response.completed / .incomplete / .failed -> response.usage
    anthropic  JSON: usage{input_tokens, output_tokens, cache_read_input_tokens, cache_creation_...}
               stream: message_start.message.usage, then message_delta.usage (cumulative)

While an unbounded stream runs (no ``max_tokens``, ``capMaxTokens: false``),
its output is counted as it arrives, as UTF-8 bytes of the text and argument
deltas: no token is shorter than a byte, so the count is an upper bound and
a cut at the budget comes early, never late. A bounded reply is paid for by
its reservation, so its events are only glanced at for the usage (a
substring test), which keeps the cost per event small. When the
budget has no room for the next delta, the stream ends cleanly in the API's
own shape (``cut_events``), so an SDK raises a clear error instead of
hanging on, or tearing, the connection.

``StreamMeter.feed`` passes whole events only (it holds back a partial event
until its blank line arrives), so it can drop one and append the closing ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sidekey.core import llmpolicy
from sidekey.proxy import llmrequests

#: An event longer than this is passed on without being read (no model sends one).
MAX_EVENT: Final = 1024 * 1024


@dataclass(slots=True)
class Usage:
    input: int = 0  # uncached input tokens
    output: int = 0
    cached: int = 0  # input tokens read from (or written to) a prompt cache

    @property
    def total(self) -> int:
        return self.input + self.output + self.cached


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(api: llmpolicy.Api, doc: Any) -> Usage | None:
    """The usage object of a reply (or of a stream's final event), normalised."""
    if not isinstance(doc, dict):
        return None
    if api == "anthropic":
        cached = _n(doc.get("cache_read_input_tokens")) + _n(doc.get("cache_creation_input_tokens"))
        return Usage(_n(doc.get("input_tokens")), _n(doc.get("output_tokens")), cached)
    if "prompt_tokens" in doc or "completion_tokens" in doc:
        details = doc.get("prompt_tokens_details")
        cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
        prompt = _n(doc.get("prompt_tokens"))
        return Usage(max(0, prompt - cached), _n(doc.get("completion_tokens")), min(cached, prompt))
    if "input_tokens" in doc:  # the Responses API
        details = doc.get("input_tokens_details")
        cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
        prompt = _n(doc.get("input_tokens"))
        return Usage(max(0, prompt - cached), _n(doc.get("output_tokens")), min(cached, prompt))
    return None


_DECODER: Final = json.JSONDecoder()


def usage_from_json(api: llmpolicy.Api, raw: bytes) -> Usage | None:
    """The ``usage`` of a JSON reply, read from its last ``"usage":`` member alone when it can be.

    Providers put usage last, after the reply's text; decoding only that object
    keeps the cost flat however long the reply is. A reply shaped otherwise is
    parsed whole.
    """
    at = raw.rfind(b'"usage"')
    if at >= 0:
        colon = at + 7
        while raw[colon:colon + 1] in (b" ", b"\t", b"\r", b"\n"):
            colon += 1
        if raw[colon:colon + 1] == b":":  # a member name (a string value "usage" is followed by , or })
            try:
                text = raw[colon + 1:].decode()
                doc, _ = _DECODER.raw_decode(text, len(text) - len(text.lstrip()))
            except (UnicodeDecodeError, ValueError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                return usage_of(api, doc)
    try:
        whole = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return usage_of(api, whole.get("usage")) if isinstance(whole, dict) else None


def cut_events(api: llmpolicy.Api, message: str) -> bytes:
    """How a stream ends at the budget, in the API's own shape."""
    if api == "anthropic":
        doc = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n"
    err = {"error": {"message": message, "type": "rate_limit_error", "code": "budget_exceeded", "param": None}}
    return b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"


def _text_bytes(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else 0


class StreamMeter:
    """Watches one SSE reply: counts output, finds usage, drops the added usage chunk, cuts.

    ``more(tokens) -> bool`` asks the budget for room for output not covered by
    the reservation; when it says no, the stream is cut: ``feed`` returns the
    closing events and ``cut`` is set, and the caller stops reading upstream.
    """

    __slots__ = ("_api", "_buf", "_call", "_covered", "_message", "_more", "counted", "cut", "usage")

    def __init__(self, api: llmpolicy.Api, call: llmrequests.Call, *,
                 more: Callable[[int], bool], message: Callable[[], str]) -> None:
        self._api = api
        self._call = call
        self._more = more
        self._message = message
        self._buf = b""
        #: Output already paid for by the reservation (None: the reply is unbounded).
        self._covered: int | None = call.max_output
        self.counted = 0  # output bytes seen, the upper bound of output tokens
        self.usage: Usage | None = None
        self.cut = False

    def feed(self, data: bytes) -> bytes:
        if self.cut:
            return b""
        buf = self._buf + data
        out: list[bytes] = []
        start = 0
        while True:
            end, sep = _boundary(buf, start)
            if end < 0:
                break
            event = buf[start:end + sep]
            start = end + sep
            keep = self._event(event)
            if self._stopped():
                out.append(cut_events(self._api, self._message()))
                self._buf = b""
                return b"".join(out)
            if keep:
                out.append(event)
        rest = buf[start:]
        if len(rest) > MAX_EVENT:  # not SSE as we know it: pass it on unread
            out.append(rest)
            rest = b""
        self._buf = rest
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest.strip() and not self.cut:
            self._event(rest)
        return rest if not self.cut else b""

    def _stopped(self) -> bool:
        return self.cut  # a method, so the check after ``_event`` is not narrowed away

    # --- one event ---------------------------------------------------------------

    def _event(self, event: bytes) -> bool:
        """Account for one event; False to drop it (the usage chunk the agent did not ask for)."""
        name = b""
        data: list[bytes] = []
        for line in event.splitlines():
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if not data:
            return True
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            return True
        if self._covered is not None and not _may_hold_usage(self._api, payload):
            return True  # a bounded reply: only the usage matters, and this event has none
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return True
        if not isinstance(doc, dict):
            return True
        if self._api == "anthropic":
            self._anthropic(doc)
            return True
        return self._openai(name, doc)

    def _openai(self, name: bytes, doc: dict[str, Any]) -> bool:
        kind = doc.get("type")
        if isinstance(kind, str) and kind.startswith("response."):  # the Responses API
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                response = doc.get("response")
                found = usage_of("openai", response.get("usage")) if isinstance(response, dict) else None
                if found is not None:
                    self.usage = found
            elif kind.endswith(".delta"):
                self._output(_text_bytes(doc.get("delta")))
            return True
        usage = doc.get("usage")
        if usage is not None:
            found = usage_of("openai", usage)
            if found is not None:
                self.usage = found
        choices = doc.get("choices")
        if isinstance(choices, list):
            if not choices and usage is not None:
                return not self._call.added_usage
            size = 0
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                size += _text_bytes(choice.get("text"))
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    size += _text_bytes(delta.get("content")) + _text_bytes(delta.get("refusal"))
                    size += _text_bytes(delta.get("reasoning_content"))
                    for call in delta.get("tool_calls") or ():
                        fn = call.get("function") if isinstance(call, dict) else None
                        if isinstance(fn, dict):
                            size += _text_bytes(fn.get("arguments")) + _text_bytes(fn.get("name"))
            self._output(size)
        return True

    def _anthropic(self, doc: dict[str, Any]) -> None:
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message")
            found = usage_of("anthropic", message.get("usage")) if isinstance(message, dict) else None
            if found is not None:
                self.usage = found
        elif kind == "message_delta":
            usage = doc.get("usage")
            if isinstance(usage, dict):
                prior = self.usage or Usage()
                # output_tokens is cumulative; input fields appear here only when they changed
                prior.output = max(prior.output, _n(usage.get("output_tokens")))
                if "input_tokens" in usage:
                    prior.input = _n(usage.get("input_tokens"))
                self.usage = prior
        elif kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict):
                self._output(_text_bytes(delta.get("text")) + _text_bytes(delta.get("partial_json"))
                             + _text_bytes(delta.get("thinking")))

    def _output(self, size: int) -> None:
        if size <= 0:
            return
        self.counted += size
        if self._covered is not None:
            return  # the reservation holds the reply's bound: the upstream stops there itself
        if not self._more(size):
            self.cut = True


_USAGE_NULL: Final = re.compile(rb'"usage"\s*:\s*null')


def _may_hold_usage(api: llmpolicy.Api, payload: bytes) -> bool:
    """A cheap look at an event of a bounded reply: could it carry the usage? (else not parsed)"""
    if api == "anthropic":
        return b'"message_start"' in payload or b'"message_delta"' in payload
    if b'"response.' in payload:  # the Responses API: the usage comes with the last event
        return (b'"response.completed"' in payload or b'"response.incomplete"' in payload
                or b'"response.failed"' in payload)
    return b'"usage"' in payload and _USAGE_NULL.search(payload) is None


def _boundary(buf: bytes, start: int) -> tuple[int, int]:
    """The end of the next event (index of its blank line) and the separator's length."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, (2 if lf >= 0 else 0)
