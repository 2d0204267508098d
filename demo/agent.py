"""The demo's agent: the real ``openai`` SDK, configured only by the injected env.

It reads the token file on every request, as agents must (the kubelet
rewrites it at 80% of its lifetime): the SDK accepts a callable as its
``api_key`` and calls it per request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import openai

from sidekey.core import contract


def pod(name: str, namespace: str, service_account: str, proxy_port: int | None) -> dict[str, Any]:
    """The agent's pod as a team would write it: an annotation, nothing else about sidekey."""
    annotations = {contract.ANNOTATION_INJECT: "true"}
    if proxy_port is not None:
        # Real pods each have their own loopback; here sidecars share one, so each gets a port.
        annotations[contract.ANNOTATION_PORT] = str(proxy_port)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "agent", "image": "python:3.12-slim",
                                 "command": ["python", "-m", "my_agent"]}]},
    }


def _client(env: Mapping[str, str]) -> openai.OpenAI:
    token_file = Path(env[contract.ENV_TOKEN_FILE])
    return openai.OpenAI(
        base_url=env["OPENAI_BASE_URL"],
        api_key=lambda: token_file.read_text().strip(),
        max_retries=0,
    )


def stream_chat(env: Mapping[str, str]) -> str:
    with _client(env) as client:
        stream = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "Say hello."}], stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def stream_until_the_budget(env: Mapping[str, str], base_url: str) -> tuple[str, str]:
    """Stream through a budgeted route: (the text that arrived, the SDK's error, or "")."""
    text = ""
    with _client({**env, "OPENAI_BASE_URL": base_url}) as client:
        try:
            stream = client.chat.completions.create(
                model="demo-model", messages=[{"role": "user", "content": "Say hello."}], stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        except openai.APIError as exc:
            return text, exc.message
    return text, ""


def list_models(env: Mapping[str, str]) -> list[str]:
    with _client(env) as client:
        return [m.id for m in client.models.list()]


def forbidden_call(env: Mapping[str, str]) -> tuple[int, str]:
    with _client(env) as client:
        try:
            client.embeddings.create(model="demo-model", input="hi")
        except openai.APIStatusError as exc:
            return exc.status_code, _message(exc.response.text)
    return 200, ""


def raw_call(port: int, token: str) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/openai/models",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return int(resp.status), ""
    except urllib.error.HTTPError as exc:
        return exc.code, _message(exc.read().decode())


def _message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]
