"""``sidekey.client``: call the sidecar with a token read fresh on every request.

The kubelet rewrites the projected token file at 80% of its lifetime, so a
client that reads the token once at start-up fails as soon as that token
expires (at most ``expirationSeconds`` later). ``SidekeyAuth`` is an httpx
``Auth`` that reads the file per request::

    import os, httpx2, openai
    from sidekey.client import SidekeyAuth

    client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused",
                           http_client=httpx2.Client(auth=SidekeyAuth()))

Current ``openai`` and ``anthropic`` SDKs are built on ``httpx2``; older ones and
LangChain's clients on ``httpx``. ``SidekeyAuth`` is an ``Auth`` of whichever of
the two is installed (both, if both are), so it plugs into either client.
Reading the file costs a few microseconds; the sidecar caches the validation.
httpx is an optional extra (``pip install sidekey[client]``): ``read_token``
works without it.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidekey.core import contract

__all__ = ["SidekeyAuth", "read_token", "token_path"]


def token_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The token file: the argument, else ``$SIDEKEY_TOKEN_FILE``, else the injected default."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(contract.ENV_TOKEN_FILE) or contract.AGENT_TOKEN_PATH)


def read_token(path: str | os.PathLike[str] | None = None) -> str:
    """The current token; call it for every request, never once at start-up."""
    return token_path(path).read_text().strip()


class _PerRequestToken:
    """The auth flow shared by the httpx and httpx2 flavours."""

    requires_request_body = False
    requires_response_body = False

    def __init__(self, token_file: str | os.PathLike[str] | None = None) -> None:
        self.token_file = token_path(token_file)

    def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        request.headers["Authorization"] = f"Bearer {read_token(self.token_file)}"
        yield request


def _auth_bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        import httpx

        bases.append(httpx.Auth)
    except ImportError:
        pass
    try:
        import httpx2  # type: ignore[import-not-found,unused-ignore]

        bases.append(httpx2.Auth)
    except ImportError:
        pass
    return tuple(bases)


if TYPE_CHECKING:
    import httpx

    class SidekeyAuth(_PerRequestToken, httpx.Auth):
        """An httpx/httpx2 ``Auth`` sending the pod's token, read from its file per request."""

else:
    SidekeyAuth = type(
        "SidekeyAuth", (_PerRequestToken, *_auth_bases()),
        {"__doc__": "An httpx/httpx2 ``Auth`` sending the pod's token, read from its file per request.",
         "__module__": __name__},
    )
