"""sidekey.client: the token is read from its file on every request."""

from __future__ import annotations

from pathlib import Path

import httpx
import httpx2
import pytest

from sidekey import client
from sidekey.core import contract


def test_the_httpx_auth_reads_the_file_per_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200)

    with httpx.Client(auth=client.SidekeyAuth(token), transport=httpx.MockTransport(handler)) as c:
        c.get("http://127.0.0.1:8787/openai/v1/models")
        token.write_text("second\n")  # the kubelet rotated it
        c.get("http://127.0.0.1:8787/openai/v1/models", headers={"Authorization": "Bearer unused"})
    assert seen == ["Bearer first", "Bearer second"]


def test_the_same_auth_plugs_into_httpx2_which_current_sdks_use(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok")
    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["Authorization"])
        return httpx2.Response(200)

    with httpx2.Client(auth=client.SidekeyAuth(token), transport=httpx2.MockTransport(handler)) as c:
        c.get("http://127.0.0.1:8787/x")
    assert seen == ["Bearer tok"]


def test_the_token_file_defaults_to_the_injected_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t").write_text(" abc \n")
    monkeypatch.setenv(contract.ENV_TOKEN_FILE, str(tmp_path / "t"))
    assert client.read_token() == "abc"
    monkeypatch.delenv(contract.ENV_TOKEN_FILE)
    assert client.token_path() == Path(contract.AGENT_TOKEN_PATH)


def test_read_token_works_as_the_openai_sdks_callable_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    token = tmp_path / "token"
    token.write_text("first")
    monkeypatch.setenv(contract.ENV_TOKEN_FILE, str(token))
    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["Authorization"])
        return httpx2.Response(200, json={"object": "list", "data": []})

    sdk = openai.OpenAI(
        base_url="http://127.0.0.1:8787/openai",
        api_key=client.read_token,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    sdk.models.list()
    token.write_text("second")
    sdk.models.list()
    assert seen == ["Bearer first", "Bearer second"]
