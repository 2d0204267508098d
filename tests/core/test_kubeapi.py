"""The aiohttp apiserver client against a small fake apiserver: tokens, errors, closing."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidekey.core import kubeapi
from tests.core import fake_apiserver


async def test_get_json_sends_the_current_token_and_rereads_a_rotated_file(
    fake: tuple[fake_apiserver.FakeApiServer, str], tmp_path: Path
) -> None:
    server, url = fake
    token = tmp_path / "token"
    token.write_text("first\n")
    async with kubeapi.ApiClient(fake_apiserver.config(url, token)) as api:
        await api.get_json(fake_apiserver.PATH)
        # the kubelet swaps the file atomically
        new = tmp_path / "token.new"
        new.write_text("second-longer")
        new.rename(token)
        await api.get_json(fake_apiserver.PATH)
    assert server.auth_headers == ["Bearer first", "Bearer second-longer"]


async def test_get_json_raises_api_error_with_the_status_fields(
    fake: tuple[fake_apiserver.FakeApiServer, str],
) -> None:
    server, url = fake
    server.forbidden = True
    async with kubeapi.ApiClient(fake_apiserver.config(url)) as api:
        with pytest.raises(kubeapi.ApiError) as info:
            await api.get_json(fake_apiserver.PATH)
    assert info.value.status == 403
    assert info.value.reason == "Forbidden"
    assert "forbidden" in info.value.message


async def test_using_a_closed_client_says_how_to_open_it() -> None:
    api = kubeapi.ApiClient(fake_apiserver.config("http://127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="async with"):
        await api.get_json(fake_apiserver.PATH)
