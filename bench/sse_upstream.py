"""The SSE upstream: streams a fixed number of small events, one write each.

Run as its own process (``python -m bench.sse_upstream PORT``), pinned with
the load generator, so the proxy's core does only the proxy's work. Events
are spaced by ``gap_ms`` (default 1 ms) so each reaches the proxy as its own
chunk, as tokens from a model do; back-to-back writes would coalesce and
make the per-event cost look smaller than it is.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

#: An OpenAI chat.completion.chunk in full (LiteLLM's arm parses and re-encodes it).
EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
         b'"model":"bench","choices":[{"index":0,"delta":{"content":"token %d"},"finish_reason":null}]}\n\n')


async def stream(request: web.Request) -> web.StreamResponse:
    if request.method == "POST":
        await request.read()  # the chat-completion request; every POST streams
    events = int(request.query.get("events", "100"))
    gap = float(request.query.get("gap_ms", "1")) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(events):
        await resp.write(EVENT % i)
        if gap:
            await asyncio.sleep(gap)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def main() -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", stream)
    app.router.add_post("/{tail:.*}", stream)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                shutdown_timeout=0.1)


if __name__ == "__main__":
    main()
