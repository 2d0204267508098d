"""The floor: a bare aiohttp passthrough proxy, for reference next to the sidecar.

It does the least a Python proxy on aiohttp can do for the same job: the
low-level ``web.Server``, one pooled ``ClientSession``, hop-by-hop headers
dropped, a static key attached, small bodies read at once and streams passed
chunk by chunk. No authentication, no policy, no scrubbing, no audit line, no
metrics. What sidekey costs above this arm is sidekey's own work; what this
arm costs is aiohttp's and asyncio's.

    python -m bench.passthrough PORT UPSTREAM_PORT SSE_PORT KEY
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                 "upgrade", "host", "authorization"})


async def serve(port: int, upstream_port: int, sse_port: int, key: str) -> None:
    session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
                                    connector=aiohttp.TCPConnector(limit=1024, limit_per_host=256))
    origins = {"bench": f"http://127.0.0.1:{upstream_port}", "sse": f"http://127.0.0.1:{sse_port}"}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        _, route, rest = request.raw_path.split("/", 2)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
        headers["Authorization"] = f"Bearer {key}"
        body = await request.read() if request.body_exists else None
        async with session.request(request.method, URL(f"{origins[route]}/{rest}", encoded=True),
                                   headers=headers, data=body, allow_redirects=False,
                                   skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept")) as up:
            out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
            if up.content_length is not None and up.content_length <= 65536:
                return web.Response(status=up.status, headers=out, body=await up.read())
            response = web.StreamResponse(status=up.status, headers=out)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, up, sse, key = sys.argv[1:5]
    asyncio.run(serve(int(port), int(up), int(sse), key))
