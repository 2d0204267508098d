"""The sidecar's process holds only what it uses: no aiohttp, kopf, kubernetes, authlib, prometheus_client, joserfc,
cryptography.

Every agent pod pays the sidecar's memory; aiohttp alone cost 14 MB of RSS and
a third of a second of start-up (issue 15), cryptography 7.8 MB (tokens are
verified by libcrypto through ctypes, core/openssl.py). These tests look at a fresh
interpreter's ``sys.modules``: after the import, and after a real start against
the fake apiserver that serves a call with an OAuth2 upstream (token fetch,
watches, JWKS, discovery), so a module imported lazily on those paths counts too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.proxy.fakes import NAMESPACE, POD, POD_UID, SA, FakeApi, Upstream, bearer_upstream, mint, policy

#: Top-level packages the sidecar must never load.
FORBIDDEN = ("aiohttp", "multidict", "yarl", "kopf", "kubernetes", "authlib", "httpx", "requests", "prometheus_client",
             "joserfc", "cryptography", "html")

_REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})), flush=True)
"""


def test_importing_the_sidecar_loads_no_http_framework_nor_kubernetes_client() -> None:
    for entry in ("import sidekey.proxy.main", "from sidekey import cli; assert cli._load('proxy') is not None"):
        out = subprocess.run([sys.executable, "-c", entry + "\n" + _REPORT], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert json.loads(out) == [], f"{entry!r} loaded {out.strip()}"


_JWKS = """
import json, sys
from sidekey.core import tokens
document = json.loads(sys.argv[1])
tokens.import_jwk({k: v for k, v in document.items() if k != "d"})
public_only = "cryptography" in sys.modules
tokens.import_jwk(document)
print(json.dumps([public_only, "cryptography" in sys.modules]), flush=True)
"""


def test_the_tokens_module_loads_cryptography_only_for_a_jwk_with_private_members() -> None:
    """A public JWK is imported by libcrypto through ctypes; one that publishes ``d`` is checked as a
    private key by cryptography, which is imported then, in that rare path only."""
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.generate_private_key(ec.SECP256R1()).private_numbers()

    def b64(number: int) -> str:
        return base64.urlsafe_b64encode(number.to_bytes(32, "big")).rstrip(b"=").decode()

    document = {"kty": "EC", "crv": "P-256", "x": b64(numbers.public_numbers.x), "y": b64(numbers.public_numbers.y),
                "d": b64(numbers.private_value)}
    out = subprocess.run([sys.executable, "-c", _JWKS, json.dumps(document)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == [False, True]


_SIDECAR = """
import asyncio, io, json, sys
from pathlib import Path
from sidekey.core import apiconfig, logs
from sidekey.proxy import settings, sidecar

server, token_file, pod, namespace, uid, account = sys.argv[1:7]

async def main() -> None:
    config = settings.Settings(pod_name=pod, namespace=namespace, pod_uid=uid, pod_ip="10.0.0.9",
                               service_account=account, port=0, health_port=0, health_address="127.0.0.1",
                               drain_seconds=1)
    api = apiconfig.ApiConfig(server=server, ca_file=None, token_file=Path(token_file))
    app = sidecar.SidecarProcess(config, api, audit=logs.AuditWriter(io.StringIO()))
    await app.start()
    for _ in range(200):
        if app.ready:
            break
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": app.ready, "port": app.proxy_port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the test's call went through
    await app.stop()

asyncio.run(main())
""" + _REPORT


async def test_a_started_sidecar_serving_an_oauth2_upstream_loads_none_of_them(
    fake_api: FakeApi, upstream: Upstream, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("api-token")
    fake_api.secrets["oauth"] = {"metadata": {"name": "oauth", "namespace": NAMESPACE},
                                 "data": {"id": "bXktY2xpZW50", "secret": "Y2xpZW50LXNlY3JldC0xMjM="}}
    fake_api.policies["p"] = policy(bearer_upstream(upstream.url, auth={
        "type": "oauth2ClientCredentials", "secretRef": {"name": "oauth"},
        "oauth2ClientCredentials": {"tokenURL": f"{upstream.url}/oauth/token", "clientIdKey": "id",
                                    "clientSecretKey": "secret"}}))
    fake_api.forbid_policies = False
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SIDECAR, f"http://127.0.0.1:{fake_api.port}", str(tmp_path / "token"),
        POD, NAMESPACE, POD_UID, SA, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        started = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert started["ready"], "the sidecar did not become ready against the fake apiserver"
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{started['port']}/openai/v1/models",
                                                       headers={"Authorization": f"Bearer {mint()}"}) as r:
            assert r.status == 200, await r.text()
        assert upstream.last.headers["Authorization"] == "Bearer access-1-abcdefgh"  # fetched by the child
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        loaded = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert loaded == [], f"the running sidecar loaded {loaded}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
