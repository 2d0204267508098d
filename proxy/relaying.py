"""The answer on its way from the upstream to the agent.

One ``Relay`` per answer, fed from the upstream protocol's callback with each
chunk as it is read, on both request paths: decoded when the upstream
compressed it, scrubbed of the key across chunk boundaries, handed through
the chunk hooks (an LLM reply's usage meter, a budget's cut), written to the
agent. Nothing is buffered beyond what scrubbing holds back, so an SSE event
leaves the moment it arrives; back-pressure is the agent connection's (a slow
reader pauses the upstream). A small compressed body is the exception: read
whole, decoded, scrubbed and sent with its new length.

``respond`` drives this for the coroutine path; ``fastpath.Exchange`` does
the same from callbacks, and the two must keep the same outcomes: a failure
before anything reached the agent is a clean 502, one after it a cut
connection (never a clean end of a truncated body).

For an event stream the relay also notes whether the last piece sent held
the final event: a client that closes right after it has completed its
stream (the OpenAI SDK does), which the audit records as such rather than as
a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, Protocol

from sidekey.proxy import decoding, llmexchange, upstream, upstreamheads

if TYPE_CHECKING:
    from sidekey.proxy import audit as auditing
    from sidekey.proxy import listener, scrubbing

log = logging.getLogger("sidekey.proxy")

#: Bodies up to this size are read at once and sent with their length; larger ones are streamed.
SMALL_BODY: Final = 64 * 1024
#: The last event of a completed stream (OpenAI's and Anthropic's): a client may close right after.
FINAL_EVENTS: Final = (b"data: [DONE]", b"event: message_stop")


def agent_left(record: auditing.AuditRecord, status: int) -> int:
    """The status to audit when the agent closed before its answer was done (both paths).

    After the final event of a stream (``record["reason"]`` is ``stream_complete``) the
    stream was complete: it keeps the answer's ``status`` and the reason ``ok``. Anything
    earlier is a ``499 client_disconnected``.
    """
    record.setdefault("decision", "allowed")
    if record.get("reason") == "stream_complete":
        record["reason"] = "ok"
        return status
    record["reason"] = "client_disconnected"
    return 499


class ChunkHook(Protocol):
    """Sees every piece of an allowed response after scrubbing (an SSE event as it arrives)."""

    def chunk(self, data: bytes) -> bytes: ...

    def end(self) -> None: ...


class Relay:
    """The body from the upstream to the agent, run from the upstream protocol's callback.

    It scrubs with ``Scrubber.release``, as ``scrubbing.StreamScrubber`` does, its
    held-back tail kept here: no second object per answer.
    """

    __slots__ = ("_decoder", "_hooks", "_pending", "_reply", "_scrubber", "_sse", "final")

    def __init__(
        self,
        reply: listener.Reply,
        scrubber: scrubbing.Scrubber,
        decoder: decoding.Decoder | None,
        hooks: list[ChunkHook],
        sse: bool = False,
    ) -> None:
        self._reply = reply
        self._sse = sse  # only an event stream has a final event to look for
        self._scrubber = scrubber
        self._pending = b""  # the held-back tail that could start a secret
        self._decoder = decoder
        self._hooks = hooks
        self.final = False

    def feed(self, chunk: bytes) -> None:
        if self._decoder is not None:
            try:
                chunk = self._decoder.feed(chunk)
            except decoding.DecodeError:
                raise upstream.Broken("a corrupt or oversized compressed body") from None
        data, self._pending = self._scrubber.release(self._pending, chunk)
        if not data:
            return
        for hook in self._hooks:
            data = hook.chunk(data)
        self._reply.write(data)
        if self._sse:
            find = data[-64:].find
            final_a, final_b = FINAL_EVENTS  # two plain tests: a generator per SSE event is measurable
            # ``find``, not ``in``: ``in`` first tries the needle as an int (a TypeError raised and cleared)
            self.final = find(final_a) >= 0 or find(final_b) >= 0
        for hook in self._hooks:
            if getattr(hook, "stopped", False):
                raise llmexchange.StreamCut("the token budget ended the stream")

    def finish(self) -> None:
        tail = b""
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except decoding.DecodeError:
                raise upstream.Broken("a corrupt or oversized compressed body") from None
        # the end of the body: the held-back tail is no secret (or it would have matched);
        # the decoder's last bytes are scrubbed with it, all sent now
        data = self._scrubber.scrub(self._pending + tail) if tail else self._pending
        self._pending = b""
        for hook in self._hooks:
            if data:
                data = hook.chunk(data)
            hook.end()
        self._reply.write(data)


async def respond(
    conn: listener.AgentConnection,
    reply: listener.Reply,
    up_conn: upstream.UpstreamConnection,
    scrubber: scrubbing.Scrubber,
    chunk_hooks: list[ChunkHook],
    record: auditing.AuditRecord,
    exchange: llmexchange.Exchange | None = None,
) -> int:
    """The coroutine path's answer to the agent: its head checked, its body relayed; the status.

    ``exchange`` is the LLM step's, which may add a chunk hook (usage, the budget's cut)
    or ask for a small JSON reply whole (the model list, filtered).
    """
    status, reason, block, decoder, length, sse = upstreamheads.response_head(up_conn, scrubber)
    if exchange is not None:
        llm_hook = exchange.response(status, sse)
        if llm_hook is not None:
            chunk_hooks = [*chunk_hooks, llm_hook]
            if llm_hook.whole and length is not None and length <= llmexchange.MAX_JSON_REPLY:
                # the model list is filtered whole and sent with its new length
                return await respond_whole(
                    reply, up_conn, decoder, scrubber, chunk_hooks, status, reason, block, record
                )
    if decoder is not None and length is not None and length <= SMALL_BODY:
        return await respond_whole(
            reply, up_conn, decoder, scrubber, chunk_hooks, status, reason, block, record
        )
    relay = Relay(reply, scrubber, decoder, chunk_hooks, sse)
    if length is None or length > SMALL_BODY or decoder is not None:
        record["streamed"] = True
    reply.start(status, reason, block, length if decoder is None else None)
    conn.on_pause, conn.on_resume = up_conn.pause, up_conn.resume
    if conn.write_paused:
        up_conn.pause()
    done = up_conn.relay(relay.feed)
    try:
        if not done.done():
            reply.uncork()  # a stream: the head now, then every chunk as it is read
            await done
        else:
            done.result()  # a small body arrived with the head: head and body leave in one send
    except asyncio.CancelledError:
        if sse and relay.final:
            record["reason"] = "stream_complete"
        record["bytes_out"] = reply.sent
        raise
    except llmexchange.StreamCut:
        # the token budget ended the stream: its closing events are sent, end it cleanly
        up_conn.abandon()
        record["bytes_out"] = reply.sent
        if length is None:
            reply.end()
        else:
            conn.abort()
        return status
    except upstream.UpstreamError as exc:
        if reply.discard():
            raise  # nothing reached the agent yet (corked): it gets a clean 502 instead
        # the status is gone: end the connection so the agent sees a cut stream,
        # not a clean end of a truncated body
        record["reason"] = "upstream_broke_stream"
        record["bytes_out"] = reply.sent
        log.info("upstream stream broke: %s", type(exc).__name__)
        up_conn.abandon()
        conn.abort()
        return status
    relay.finish()
    reply.end()
    record["bytes_out"] = reply.sent
    return status


async def respond_whole(
    reply: listener.Reply,
    up_conn: upstream.UpstreamConnection,
    decoder: decoding.Decoder | None,
    scrubber: scrubbing.Scrubber,
    chunk_hooks: list[ChunkHook],
    status: int,
    reason: bytes,
    block: bytes,
    record: auditing.AuditRecord,
) -> int:
    """A small compressed body (or an LLM reply its hook wants whole): read, decoded, scrubbed, sent with its length."""
    parts: list[bytes] = []
    await up_conn.relay(parts.append)
    try:
        data = b"".join(parts) if decoder is None else decoder.feed(b"".join(parts)) + decoder.flush()
    except decoding.DecodeError:
        raise upstream.Unacceptable("the upstream sent a corrupt or oversized compressed body") from None
    body = scrubber.scrub(data)
    for hook in chunk_hooks:
        body = hook.chunk(body)
        hook.end()
    reply.whole(status, block, body, reason)
    record["bytes_out"] = len(body)
    return status
