"""The aiohttp apiserver client against a small fake apiserver that speaks list/watch."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from sidekey.core import apiconfig, certificates, contract, kubeapi, reflector

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


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeApiServer, str]]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_get(PATH, server.handle)
    app.router.add_get("/api/v1/namespaces/ns/configmaps/x", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _config(url: str, token_file: Path | None = None) -> apiconfig.ApiConfig:
    return apiconfig.ApiConfig(server=url, ca_file=None, token_file=token_file)


async def _until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- configuration -------------------------------------------------------------


def test_in_cluster_config_reads_the_token_dir_and_server_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("ca")
    monkeypatch.setenv(contract.ENV_API_TOKEN_DIR, str(tmp_path))
    monkeypatch.setenv(contract.ENV_API_SERVER, "https://127.0.0.1:6443/")
    cfg = apiconfig.ApiConfig.in_cluster()
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.token_file == tmp_path / "token"
    assert cfg.ca_file == tmp_path / "ca.crt"


def test_in_cluster_config_falls_back_to_the_service_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "ca.crt").write_bytes(certificates.make_ca("cluster").cert_pem)
    cfg = apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)
    assert cfg.server == "https://10.0.0.1:443"
    assert cfg.ca_file == tmp_path / "ca.crt"


def test_in_cluster_config_without_the_mounted_ca_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the system store would accept any host with a public certificate
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ValueError, match=r"no cluster CA at .*ca\.crt.*never against the system store"):
        apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)


def test_in_cluster_config_for_a_plain_http_test_server_needs_no_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(contract.ENV_API_SERVER, "http://127.0.0.1:8001")
    cfg = apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)
    assert cfg.ca_file is None


def test_the_ssl_context_trusts_the_cluster_ca_alone(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(certificates.make_ca("cluster").cert_pem)
    ctx = apiconfig.ApiConfig(server="https://10.0.0.1:443", ca_file=ca, token_file=None).ssl_context()
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert subjects == [{"commonName": "cluster"}]


def test_an_unreadable_cluster_ca_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    config = apiconfig.ApiConfig(server="https://10.0.0.1:443", ca_file=ca, token_file=None)
    with pytest.raises(ValueError, match=r"cannot load the cluster CA from .*ca\.crt"):
        config.ssl_context()


def test_in_cluster_config_without_any_server_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(contract.ENV_API_SERVER, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match=contract.ENV_API_SERVER):
        apiconfig.ApiConfig.in_cluster(token_dir=tmp_path)


def test_kubeconfig_inline_data_is_written_to_private_files(tmp_path: Path) -> None:
    kc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {
                "name": "k",
                "cluster": {
                    "server": "https://127.0.0.1:1",
                    "certificate-authority-data": base64.b64encode(b"CA").decode(),
                },
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate-data": base64.b64encode(b"CERT").decode(),
                    "client-key-data": base64.b64encode(b"KEY").decode(),
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    assert cfg.server == "https://127.0.0.1:1"
    assert cfg.ca_data == b"CA" and cfg.ca_file is None
    assert cfg.client_cert_data == b"CERT" and cfg.client_key_data == b"KEY"
    assert cfg.client_key is None  # kept as data, never a path to a file left behind


def test_kubeconfig_with_a_token_and_relative_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    kc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {"name": "k", "cluster": {"server": "https://h:1", "certificate-authority": "ca.pem"}}
        ],
        "users": [{"name": "u", "user": {"token": "abc"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    assert cfg.ca_file == tmp_path / "ca.pem"
    assert cfg.token == "abc" and cfg.token_file is None
    assert "abc" not in repr(cfg)


def test_inline_kubeconfig_credentials_leave_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kubeconfig's client key and token stay in memory: nothing is left in the temp dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ca = certificates.make_ca("kubeconfig-ca")
    client = certificates.issue(ca, "admin", client=True, server=False)
    kc = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1",
                                               "certificate-authority-data": base64.b64encode(ca.cert_pem).decode()}}],
        "users": [{"name": "u", "user": {"client-certificate-data": base64.b64encode(client.cert_pem).decode(),
                                         "client-key-data": base64.b64encode(client.key_pem).decode(),
                                         "token": "tok-123"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    cfg = apiconfig.ApiConfig.from_kubeconfig(path)
    ctx = cfg.ssl_context()  # loads the CA from memory and the client chain through a transient file
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert list(temp.iterdir()) == [], "a credential was left on disk"
    assert kubeapi._TokenFile(cfg.token_file, static=cfg.token).header() == "Bearer tok-123"


# --- requests ------------------------------------------------------------------


async def test_get_json_sends_the_current_token_and_rereads_a_rotated_file(
    fake: tuple[FakeApiServer, str], tmp_path: Path
) -> None:
    server, url = fake
    token = tmp_path / "token"
    token.write_text("first\n")
    async with kubeapi.ApiClient(_config(url, token)) as api:
        await api.get_json(PATH)
        # the kubelet swaps the file atomically
        new = tmp_path / "token.new"
        new.write_text("second-longer")
        new.rename(token)
        await api.get_json(PATH)
    assert server.auth_headers == ["Bearer first", "Bearer second-longer"]


async def test_get_json_raises_api_error_with_the_status_fields(
    fake: tuple[FakeApiServer, str],
) -> None:
    server, url = fake
    server.forbidden = True
    async with kubeapi.ApiClient(_config(url)) as api:
        with pytest.raises(kubeapi.ApiError) as info:
            await api.get_json(PATH)
    assert info.value.status == 403
    assert info.value.reason == "Forbidden"
    assert "forbidden" in info.value.message


async def test_using_a_closed_client_says_how_to_open_it() -> None:
    api = kubeapi.ApiClient(_config("http://127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="async with"):
        await api.get_json(PATH)


# --- the reflector -----------------------------------------------------------------


async def test_reflector_lists_then_follows_watch_events(fake: tuple[FakeApiServer, str]) -> None:
    server, url = fake
    await server.put("a", {"k": "1"})
    changes: list[int] = []
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH, on_change=lambda: changes.append(1))
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            assert set(r.objects) == {"ns/a"}
            await _until(lambda: server.watches_open == 1)
            await server.put("b", {"k": "2"})
            await _until(lambda: "ns/b" in r.objects)
            await server.put("a", {"k": "3"}, kind="MODIFIED")
            await _until(lambda: r.objects["ns/a"]["data"] == {"k": "3"})
            await server.put("b", kind="DELETED")
            await _until(lambda: "ns/b" not in r.objects)
        finally:
            task.cancel()
    assert len(changes) >= 4
    watch = next(q for q in server.requests if q.get("watch") == "true")
    assert watch["allowWatchBookmarks"] == "true"
    assert 240 <= int(watch["timeoutSeconds"]) <= 300
    assert watch["resourceVersion"] == "11"


async def test_reflector_with_a_field_selector_sees_only_that_name(
    fake: tuple[FakeApiServer, str],
) -> None:
    server, url = fake
    await server.put("mine")
    await server.put("other")
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH, field_selector="metadata.name=mine")
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await _until(lambda: server.watches_open == 1)
            await server.put("other", {"x": "y"}, kind="MODIFIED")
            await server.put("mine", {"x": "z"}, kind="MODIFIED")
            await _until(lambda: r.objects["ns/mine"]["data"] == {"x": "z"})
        finally:
            task.cancel()
    assert set(r.objects) == {"ns/mine"}
    assert all(q.get("fieldSelector") == "metadata.name=mine" for q in server.requests)


async def test_reflector_relists_after_410_gone(
    fake: tuple[FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "RELIST_JITTER", 0.01)
    server, url = fake
    await server.put("a")
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await _until(lambda: server.watches_open == 1)
            # history is compacted: the open watch ends and resuming gets 410
            server.objects["c"] = {
                "metadata": {"name": "c", "namespace": "ns", "resourceVersion": "50"}
            }
            server.rv = 50
            server.oldest_rv = 100
            async with server.changed:
                server.changed.notify_all()
            await _until(lambda: "ns/c" in r.objects)
        finally:
            task.cancel()
    lists = [q for q in server.requests if q.get("watch") != "true"]
    assert len(lists) >= 2


async def test_reflector_treats_forbidden_as_empty_and_keeps_retrying(
    fake: tuple[FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    monkeypatch.setattr(reflector, "FORBIDDEN_RETRY_MAX", 0.1)
    server, url = fake
    server.forbidden = True
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH, forbidden_is_empty=True)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            assert r.objects == {}
            assert r.forbidden
            await server.put("late")
            server.forbidden = False
            await _until(lambda: "ns/late" in r.objects)
            assert not r.forbidden
        finally:
            task.cancel()


async def test_reflector_without_forbidden_is_empty_is_not_synced_by_a_403(
    fake: tuple[FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    server, url = fake
    server.forbidden = True
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await _until(lambda: len(errors) >= 2)
            assert not r.synced.is_set()
        finally:
            task.cancel()
    assert all(isinstance(e, kubeapi.ApiError) and e.status == 403 for e in errors)


async def test_reflector_keeps_its_cache_while_the_apiserver_is_down(
    fake: tuple[FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.05)
    server, url = fake
    await server.put("a", {"k": "v"})
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(_config(url)) as api:
        r = reflector.Reflector(api, PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await asyncio.wait_for(r.synced.wait(), 3)
            await _until(lambda: server.watches_open == 1)
            server.fail_with = 500
            server.oldest_rv = 10_000  # end the open watch
            async with server.changed:
                server.changed.notify_all()
            await _until(lambda: len(errors) >= 1)
            assert r.objects["ns/a"]["data"] == {"k": "v"}
        finally:
            task.cancel()


async def test_reflector_against_a_closed_port_backs_off_and_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reflector, "BACKOFF_START", 0.01)
    errors: list[BaseException] = []
    async with kubeapi.ApiClient(_config("http://127.0.0.1:9")) as api:
        r = reflector.Reflector(api, PATH, on_error=errors.append)
        task = asyncio.create_task(r.run())
        try:
            await _until(lambda: len(errors) >= 2)
        finally:
            task.cancel()
    assert not r.synced.is_set()
