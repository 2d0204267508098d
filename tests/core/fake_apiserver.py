"""A small fake apiserver that speaks list and watch, for the apiserver client and Reflector tests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from sidekey.core import apiconfig

PATH = "/api/v1/namespaces/ns/secrets"


class FakeApiServer:
    """Lists and watches one collection; can forget history (410) or refuse (403)."""

    def __init__(self) -> None:
        self.rv = 10
        self.objects: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.oldest_rv = 0  # watches from before this get 410
        self.forbidden = False
        self.fail_with: int | None = None
        self.auth_headers: list[str | None] = []
        self.requests: list[dict[str, str]] = []
        self.changed = asyncio.Condition()
        self.watches_open = 0

    async def put(
        self, name: str, data: dict[str, str] | None = None, *, kind: str = "ADDED"
    ) -> None:
        self.rv += 1
        obj = {
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(self.rv)},
            "data": data or {},
        }
        if kind != "DELETED":
            self.objects[name] = obj
        else:
            self.objects.pop(name, None)
        self.history.append((self.rv, {"type": kind, "object": obj}))
        async with self.changed:
            self.changed.notify_all()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        self.requests.append(dict(request.query))
        if self.forbidden:
            return web.json_response(
                {
                    "kind": "Status",
                    "reason": "Forbidden",
                    "code": 403,
                    "message": "secrets is forbidden",
                },
                status=403,
            )
        if self.fail_with:
            return web.json_response(
                {"kind": "Status", "reason": "InternalError", "message": "boom"},
                status=self.fail_with,
            )
        fs = request.query.get("fieldSelector", "")
        wanted = fs.split("=", 1)[1] if fs.startswith("metadata.name=") else None

        def match(obj: dict[str, Any]) -> bool:
            return wanted is None or obj["metadata"]["name"] == wanted

        if request.query.get("watch") != "true":
            items = [o for o in self.objects.values() if match(o)]
            return web.json_response(
                {"items": items, "metadata": {"resourceVersion": str(self.rv)}}
            )
        since = int(request.query.get("resourceVersion", "0") or 0)
        resp = web.StreamResponse()
        await resp.prepare(request)
        if since < self.oldest_rv:
            line = {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                },
            }
            await resp.write(json.dumps(line).encode() + b"\n")
            return resp
        self.watches_open += 1
        try:
            sent = since
            while True:
                for rv, event in list(self.history):
                    if rv > sent and match(event["object"]):
                        # split one event across two writes to test reassembly
                        raw = json.dumps(event).encode() + b"\n"
                        await resp.write(raw[:7])
                        await resp.write(raw[7:])
                    sent = max(sent, rv)
                if self.oldest_rv > sent:
                    return resp
                async with self.changed:
                    await self.changed.wait()
        finally:
            self.watches_open -= 1


def config(url: str, token_file: Path | None = None) -> apiconfig.ApiConfig:
    return apiconfig.ApiConfig(server=url, ca_file=None, token_file=token_file)


async def until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
